"""`python -m ipadapter_jax COMMAND ...`: the same as `ipadapter-jax COMMAND ...`."""

import sys

from ipadapter_jax.cli.main import main

if __name__ == "__main__":
  sys.exit(main())
