r"""Toy world, stage 2: the text-to-image base model, a pixel-space UNet (no VAE: 16x16 RGB is
small enough) conditioned on the toy CLIP's text tower, trained from scratch.

  python train.py --config configs/toy_base.py --workdir runs/toy/base
Exports runs/toy/base/pipeline, a diffusers pipeline folder.
"""

from ipadapter_jax.configs import toy_world


def get_config():
  c = toy_world.stage_config()
  c.model.pretrained = f"{toy_world.WORKDIR}/init/base"  # random UNet + the trained text tower
  c.model.image_encoder = ""
  c.model.trainable = "unet"
  c.num_steps = 1300
  c.optimizer.learning_rate = 2e-3
  c.dropout.image = 0.0
  c.dropout.text = 0.1     # unconditional examples for classifier-free guidance
  c.dropout.both = 0.0
  return c
