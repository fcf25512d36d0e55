r"""The toy world's training settings, shared by its stages (`ipadapter-jax toy` runs
them; each also runs alone once what it starts from exists):

  ipadapter-jax toy pretrain        # CLIP, VAE, base, community model, image encoder
  ipadapter-jax train --config toy_clip --workdir runs/toy/clip
  ipadapter-jax train --config toy_vae --workdir runs/toy/vae
  ipadapter-jax train --config toy_base --workdir runs/toy/base
  ipadapter-jax train --config toy_community --workdir runs/toy/community
  ipadapter-jax train --config toy_image_encoder --workdir runs/toy/image_encoder
  ipadapter-jax train --config toy_adapter --workdir runs/toy/adapter
  ipadapter-jax train --config toy_finetune --workdir runs/toy/finetune

The adapter and the fine-tuned baseline start from the pretrained toy weights the package ships
(`SHIPPED`); paths under `WORKDIR` are the toy world's default directory, runs/toy. The toy
models' architectures are defined here too: a miniature Stable Diffusion (CLIP text encoder, an
f=4 AutoencoderKL with 4 latent channels, a latent UNet) at 32x32 pixels.
"""

import os

from ipadapter_jax.configs import sd15_ip_adapter

WORKDIR = "runs/toy"
IMAGE_SIZE = 32
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")

# The toy models, in diffusers' / transformers' config keys.
TEXT_CONFIG = dict(
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=16,
  hidden_act="quick_gelu",
  bos_token_id=0,
  eos_token_id=1,
  pad_token_id=1,
  projection_dim=64,
)
VISION_CONFIG = dict(
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  image_size=IMAGE_SIZE,
  patch_size=4,
  num_channels=3,
  hidden_act="quick_gelu",
  projection_dim=64,
)
# f=4: 32x32x3 pixels <-> 8x8x4 latents. The scaling factor is measured on the training images
# after the VAE stage (1 / the latents' standard deviation, as Stable Diffusion's was chosen).
VAE_CONFIG = dict(
  block_out_channels=(32, 64, 64),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=8,
  sample_size=IMAGE_SIZE,
  scaling_factor=1.0,
)
LATENT_SIZE = IMAGE_SIZE // 4
UNET_CONFIG = dict(  # cross-attention at 8x8, 4x4 and the middle (2x2)
  block_out_channels=(64, 128, 128),
  layers_per_block=1,
  norm_num_groups=16,
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  cross_attention_dim=64,
  attention_head_dim=8,
  in_channels=4,
  out_channels=4,
  sample_size=LATENT_SIZE,
)
# Stable Diffusion's scaled-linear betas in latent space; v-prediction (as SD 2's 768 models).
SCHEDULER_CONFIG = {
  "_class_name": "DDIMScheduler",
  "num_train_timesteps": 1000,
  "beta_start": 0.00085,
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "prediction_type": "v_prediction",
  "clip_sample": False,
  "set_alpha_to_one": False,
  "steps_offset": 1,
  "timestep_spacing": "trailing",
}


def stage_config(workdir: str = WORKDIR):
  """The settings every toy stage shares: 32x32 shapes, small batches, frequent logs, and a
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
  c.eval_judge = "ipadapter_jax.toy.shapes:judge"  # eval/colour and eval/shape from the pixels
  return c
