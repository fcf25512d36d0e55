r"""The toy world's training settings, shared by its stages (`python -m ipadapter_jax.toy` runs
them; each also runs alone once what it starts from exists):

  python -m ipadapter_jax.toy pretrain        # CLIP, base and community model from nothing
  python train.py --config configs/toy_clip.py --workdir runs/toy/clip
  python train.py --config configs/toy_base.py --workdir runs/toy/base
  python train.py --config configs/toy_community.py --workdir runs/toy/community
  python train.py --config configs/toy_adapter.py --workdir runs/toy/adapter
  python train.py --config configs/toy_finetune.py --workdir runs/toy/finetune

The adapter and the fine-tuned baseline start from the pretrained toy weights the package ships
(`SHIPPED`); paths under `WORKDIR` are the toy world's default directory, runs/toy.
"""

import os

from ipadapter_jax.configs import sd15_ip_adapter

WORKDIR = "runs/toy"
IMAGE_SIZE = 16
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy_weights")


def stage_config(workdir: str = WORKDIR):
  """The settings every toy stage shares: 16x16 shapes, small batches, frequent logs, and a
  validation on held-out prompt images (the toy CLIP scores them)."""
  c = sd15_ip_adapter.get_config()
  c.seed = 0
  c.data.source = f"{workdir}/data/train"
  c.data.resolution = IMAGE_SIZE
  c.batch_size = 32
  c.log_every = 25
  c.checkpoint_every = 250
  c.keep_last = 1
  c.keep_every = 0
  c.sample_every = 0
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 50
  c.optimizer.grad_clip = 1.0
  c.optimizer.weight_decay = 0.0
  c.eval_annotations = f"{workdir}/data/heldout/data.json"
  c.eval_clip = f"{SHIPPED}/clip"
  c.eval_limit = 64
  c.eval_steps = 20
  c.eval_guidance_scale = 1.0  # the toy base follows its text best unguided (docs/toy_world.md)
  c.eval_batch_size = 64
  return c
