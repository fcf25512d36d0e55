r"""Toy world, pretraining stage 5: the adapter's image encoder, the toy CLIP trained further with
larger batches, until its image embedding tells the shapes apart (after stage 1 it told the
colours apart but the shapes no better than chance, docs/toy_world.md).

  ipadapter-jax train --config toy_image_encoder --workdir runs/toy/image_encoder
Exports runs/toy/image_encoder/clip, the CLIPModel folder the package ships as `clip/`: the
adapter's image encoder and the evaluation's scorer. The base keeps the text tower of stage 1, as
Stable Diffusion's text encoder and IP-Adapter's image encoder are different CLIPs.
"""

from ipadapter_jax.toy.configs import clip as toy_clip
from ipadapter_jax.toy.configs import world as toy_world


def get_config():
  c = toy_clip.get_config()
  c.model.pretrained = f"{toy_world.WORKDIR}/clip/clip"
  c.batch_size = 256  # more in-batch negatives that differ only in their shape
  c.num_steps = 1000
  c.optimizer.learning_rate = 5e-4
  return c
