"""`python -m ipadapter_jax.toy`: the toy world's command (ipadapter_jax.toy.command)."""

import sys

from ipadapter_jax.toy.command import main

sys.exit(main())
