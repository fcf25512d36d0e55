r"""Toy world, pretraining stage 1: a tiny CLIP (text + vision towers) trained contrastively on the shapes.

  python train.py --config configs/toy_clip.py --workdir runs/toy/clip
Exports runs/toy/clip/clip, a transformers CLIPModel folder.
"""

from ipadapter_jax.configs.toy_clip import get_config  # noqa: F401  (defined in the package)
