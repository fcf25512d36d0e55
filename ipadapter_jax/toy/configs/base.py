r"""Toy world, pretraining stage 3: the text-to-image base model, a latent UNet (on the toy VAE's
8x8x4 latents) conditioned on the toy CLIP's text tower, trained from scratch on an embedding
cache of its data (VAE moments and text states computed once, as for a real run).

  ipadapter-jax train --config toy_base --workdir runs/toy/base
Exports runs/toy/base/pipeline, a diffusers pipeline folder (sampled with its EMA weights).
"""

from ipadapter_jax.toy.configs import world as toy_world


def get_config():
  c = toy_world.stage_config()
  c.model.pretrained = f"{toy_world.WORKDIR}/init/base"  # random UNet + trained text tower + VAE
  c.model.image_encoder = ""
  c.data.source = f"{toy_world.WORKDIR}/data/base_cache"  # half of its captions name everything
  c.model.trainable = "unet"
  c.batch_size = 32
  c.num_steps = 5000
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.ema_decay = 0.999
  c.noise.snr_gamma = 5.0  # min-SNR weighting: the nearly clean steps stop dominating the loss
  c.dropout.image = 0.0
  c.dropout.text = 0.1  # unconditional examples for classifier-free guidance
  c.dropout.both = 0.0
  c.eval_every = 500  # the caption alone: does the base draw what it names?
  c.eval_clip = f"{toy_world.WORKDIR}/clip/clip"
  return c
