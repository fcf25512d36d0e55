r"""Toy world: the fully fine-tuned baseline the paper compares adapters with. The same image
projection and decoupled attention as the adapter, but the whole UNet trains with it on the
image embeddings (trainable=all), with the adapter's data, steps and settings.

  python train.py --config configs/toy_finetune.py --workdir runs/toy/finetune
Exports runs/toy/finetune/pipeline and runs/toy/finetune/ip_adapter.safetensors.
"""

from ipadapter_jax.configs.toy_finetune import get_config  # noqa: F401  (defined in the package)
