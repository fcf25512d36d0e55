r"""Sample images with text + image prompts. `python sample.py --help` lists the flags.

  python sample.py --pretrained runwayml/stable-diffusion-v1-5 \
      --image_encoder h94/IP-Adapter/models/image_encoder \
      --ip_adapter ip-adapter_sd15.safetensors --image cat.png --prompt "" --out grid.png
"""

import sys

from ipadapter_jax.cli.sample import main

if __name__ == "__main__":
  sys.exit(main())
