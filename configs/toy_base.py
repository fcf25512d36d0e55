r"""Toy world, pretraining stage 2: the text-to-image base model, a pixel-space UNet (no VAE: 16x16 RGB is
small enough) conditioned on the toy CLIP's text tower, trained from scratch.

  python train.py --config configs/toy_base.py --workdir runs/toy/base
Exports runs/toy/base/pipeline, a diffusers pipeline folder.
"""

from ipadapter_jax.configs.toy_base import get_config  # noqa: F401  (defined in the package)
