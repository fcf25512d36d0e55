# `--config toy_finetune` as a file (the package's docstring and get_config).
from ipadapter_jax.toy.configs.finetune import __doc__, get_config  # noqa: F401
