r"""Toy world, pretraining stage 1: a tiny CLIP (text + vision towers) trained contrastively on
the shapes.

  ipadapter-jax train --config toy_clip --workdir runs/toy/clip
Exports runs/toy/clip/clip, a transformers CLIPModel folder.
"""

from ipadapter_jax.toy.configs import world as toy_world


def get_config():
  c = toy_world.stage_config()
  c.model.pretrained = f"{toy_world.WORKDIR}/init/clip"  # randomly initialised CLIPModel folder
  c.model.image_encoder = ""
  c.model.trainable = "clip"
  c.data.source = f"{toy_world.WORKDIR}/data/clip"  # every caption names every attribute
  c.batch_size = 64
  c.num_steps = 1200
  c.optimizer.learning_rate = 1e-3
  c.contrastive_temperature = 0.07
  return c
