"""The training configs the library and its toy world are built on, by name.

`ipadapter-jax train --config NAME` takes a name from `CONFIGS`, or the path of any file that
defines `get_config()`. `configs/` at the repository root holds one file per name for
`python train.py --config FILE`, each importing its module here.

Nothing here imports a config: a name maps to a module name and to the file that defines it (the
toy configs' package imports the toy world, and a misspelt name should not wait for JAX).
"""

from __future__ import annotations

import os

# Name -> the module that defines its get_config().
CONFIGS = {
  "sd15": "ipadapter_jax.configs.sd15_ip_adapter",
  "sd15_plus": "ipadapter_jax.configs.sd15_ip_adapter_plus",
  "sdxl": "ipadapter_jax.configs.sdxl_ip_adapter",
  # The toy world's stages (ipadapter_jax/toy/configs/), in the order they run.
  **{
    f"toy_{stage}": f"ipadapter_jax.toy.configs.{stage}"
    for stage in ("clip", "vae", "base", "community", "image_encoder", "adapter", "finetune")
  },
}


def config_file(name: str) -> str | None:
  """The installed file that defines config `name`; None for a name not in CONFIGS."""
  if name not in CONFIGS:
    return None
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the ipadapter_jax folder
  *folders, module = CONFIGS[name].split(".")[1:]
  return os.path.join(package, *folders, module + ".py")
