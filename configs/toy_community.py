r"""Toy world, pretraining stage 3: a "community model", the base fine-tuned on a shifted world
(backgrounds from another part of the palette), as users fine-tune Stable Diffusion. An adapter
trained on the base is applied to it unchanged (the paper's claim of transfer).

  python train.py --config configs/toy_community.py --workdir runs/toy/community
Exports runs/toy/community/pipeline.
"""

from ipadapter_jax.configs.toy_community import get_config  # noqa: F401  (defined in the package)
