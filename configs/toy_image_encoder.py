# `--config toy_image_encoder` as a file (the package's docstring and get_config).
from ipadapter_jax.toy.configs.image_encoder import __doc__, get_config  # noqa: F401
