r"""Toy world: the IP-Adapter on the frozen, pretrained toy base, with the toy CLIP's image tower.

  ipadapter-jax train --config toy_adapter --workdir runs/toy/adapter
Exports runs/toy/adapter/ip_adapter.safetensors in the official format.

Captions often name the shape and colour already; dropping the text more often than the paper's
5% makes the image prompt carry them.
"""

from ipadapter_jax.toy.configs import world as toy_world


def get_config():
  c = toy_world.stage_config()
  c.model.pretrained = f"{toy_world.SHIPPED}/base"
  c.model.image_encoder = f"{toy_world.SHIPPED}/clip"
  c.model.trainable = "adapter"
  c.model.adapter.num_tokens = 4
  c.num_steps = 500
  c.optimizer.learning_rate = 1e-3
  c.dropout.image = 0.05
  c.dropout.text = 0.4
  c.dropout.both = 0.05
  c.eval_every = 250  # the prompt image alone: does it come back?
  return c
