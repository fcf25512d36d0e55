r"""Toy world: the fully fine-tuned baseline the paper compares adapters with. The same image
projection and decoupled attention as the adapter, but the whole UNet trains with it on the
image embeddings (trainable=all), with the adapter's data, steps and settings.

  ipadapter-jax train --config toy_finetune --workdir runs/toy/finetune
Exports runs/toy/finetune/pipeline and runs/toy/finetune/ip_adapter.safetensors.
"""

from ipadapter_jax.toy.configs import adapter as toy_adapter


def get_config():
  c = toy_adapter.get_config()
  c.model.trainable = "all"
  c.optimizer.learning_rate = 5e-4  # the UNet's weights move too: a gentler step
  return c
