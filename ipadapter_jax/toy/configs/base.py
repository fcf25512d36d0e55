r"""Toy world, pretraining stage 2: the text-to-image base model, a pixel-space UNet (no VAE:
16x16 RGB is small enough) conditioned on the toy CLIP's text tower, trained from scratch.

  python train.py --config configs/toy_base.py --workdir runs/toy/base
Exports runs/toy/base/pipeline, a diffusers pipeline folder (sampled with its EMA weights).
"""

from ipadapter_jax.toy.configs import world as toy_world


def get_config():
  c = toy_world.stage_config()
  c.model.pretrained = f"{toy_world.WORKDIR}/init/base"  # random UNet + the trained text tower
  c.model.image_encoder = ""
  c.data.source = f"{toy_world.WORKDIR}/data/base"  # half of its captions name everything
  c.model.trainable = "unet"
  c.num_steps = 3000
  c.optimizer.learning_rate = 2e-3
  c.optimizer.ema_decay = 0.999
  c.dropout.image = 0.0
  c.dropout.text = 0.1     # unconditional examples for classifier-free guidance
  c.dropout.both = 0.0
  c.eval_every = 500       # the caption alone: does the base draw what it names?
  c.eval_clip = f"{toy_world.WORKDIR}/clip/clip"
  return c
