from ipadapter_jax.toy.configs.image_encoder import __doc__, get_config  # noqa: F401  (one definition, in the package)
