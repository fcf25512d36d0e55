# `--config sd15_plus` as a file (the package's docstring and get_config).
from ipadapter_jax.configs.sd15_ip_adapter_plus import __doc__, get_config  # noqa: F401
