# `--config sd15` as a file (the package's docstring and get_config).
from ipadapter_jax.configs.sd15_ip_adapter import __doc__, get_config  # noqa: F401
