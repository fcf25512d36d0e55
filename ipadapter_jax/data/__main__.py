"""`python -m ipadapter_jax.data`: the same as `ipadapter-jax data`."""

import sys

from ipadapter_jax.cli.data import main

sys.exit(main())
