"""`python sample.py ...` runs `ipadapter-jax sample ...` (ipadapter_jax/cli/sample.py)."""

import sys

from ipadapter_jax.cli.sample import main

if __name__ == "__main__":
  sys.exit(main())
