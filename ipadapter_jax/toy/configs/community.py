r"""Toy world, pretraining stage 4: a "community model", the base fine-tuned on a shifted world
(backgrounds from another part of the palette), as users fine-tune Stable Diffusion. An adapter
trained on the base is applied to it unchanged (the paper's claim of transfer).

  ipadapter-jax train --config toy_community --workdir runs/toy/community
Exports runs/toy/community/pipeline.
"""

from ipadapter_jax.toy.configs import base as toy_base
from ipadapter_jax.toy.configs import world as toy_world


def get_config():
  c = toy_base.get_config()
  c.model.pretrained = f"{toy_world.WORKDIR}/base/pipeline"
  c.data.source = f"{toy_world.WORKDIR}/data/community_cache"
  c.eval_annotations = f"{toy_world.WORKDIR}/data/heldout_community/data.json"
  c.num_steps = 600
  c.optimizer.learning_rate = 5e-4
  c.optimizer.warmup_steps = 20
  c.eval_every = 300
  return c
