"""`python train.py ...` runs `ipadapter-jax train ...` (ipadapter_jax/cli/train.py)."""

import sys

from ipadapter_jax.cli.train import main

if __name__ == "__main__":
  sys.exit(main())
