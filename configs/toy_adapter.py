r"""Toy world, stage 3: the IP-Adapter on the frozen toy base, with the toy CLIP's image tower.

  python train.py --config configs/toy_adapter.py --workdir runs/toy/adapter
Exports runs/toy/adapter/ip_adapter.safetensors in the official format.

Captions often name the shape and colour already; dropping the text more often than the paper's
5% makes the image prompt carry them.
"""

from ipadapter_jax.configs.toy_adapter import get_config  # noqa: F401  (defined in the package)
