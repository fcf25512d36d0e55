r"""Toy world, pretraining stage 2: the VAE, a tiny AutoencoderKL (f=4, 4 latent channels) trained
from scratch to reconstruct the shapes (pixel MSE plus a small KL term).

  ipadapter-jax train --config toy_vae --workdir runs/toy/vae
Exports runs/toy/vae/vae, a diffusers AutoencoderKL folder.
"""

from ipadapter_jax.toy.configs import world as toy_world


def get_config():
  c = toy_world.stage_config()
  c.model.pretrained = f"{toy_world.WORKDIR}/init/vae"  # randomly initialised AutoencoderKL folder
  c.model.image_encoder = ""
  c.model.trainable = "vae"
  c.data.source = f"{toy_world.WORKDIR}/data/clip"  # every background: both worlds' images
  c.batch_size = 32
  c.num_steps = 1200
  c.optimizer.learning_rate = 1e-3
  c.vae_kl_weight = 1e-4
  return c
