r"""The toy world's training settings, shared by its three stages (`python -m ipadapter_jax.toy`
runs them all; each also runs alone once the stage before it has finished):

  python train.py --config configs/toy_clip.py --workdir runs/toy/clip
  python train.py --config configs/toy_base.py --workdir runs/toy/base
  python train.py --config configs/toy_adapter.py --workdir runs/toy/adapter

Paths assume the toy world's default directory, runs/toy.
"""

from ipadapter_jax.configs import sd15_ip_adapter

WORKDIR = "runs/toy"
IMAGE_SIZE = 16


def stage_config(workdir: str = WORKDIR):
  """The settings every toy stage shares: 16x16 shapes, small batches, frequent logs."""
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
  return c
