r"""The toy world's training settings, shared by its stages (`python -m ipadapter_jax.toy` runs
them; each also runs alone once what it starts from exists):

  python -m ipadapter_jax.toy pretrain        # CLIP, base and community model from nothing
  python train.py --config configs/toy_clip.py --workdir runs/toy/clip
  python train.py --config configs/toy_base.py --workdir runs/toy/base
  python train.py --config configs/toy_community.py --workdir runs/toy/community
  python train.py --config configs/toy_adapter.py --workdir runs/toy/adapter
  python train.py --config configs/toy_finetune.py --workdir runs/toy/finetune

The adapter and the fine-tuned baseline start from the pretrained toy weights the package ships
(`SHIPPED`); paths under `WORKDIR` are the toy world's default directory, runs/toy. The toy
models' architectures are defined here too.
"""

import os

from ipadapter_jax.configs import sd15_ip_adapter

WORKDIR = "runs/toy"
IMAGE_SIZE = 16
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")

# The toy models, in diffusers' / transformers' config keys. Pixel space: at 16x16 RGB a VAE
# would save nothing.
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                   bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64)
VISION_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=4, num_channels=3,
                     hidden_act="quick_gelu", projection_dim=64)
UNET_CONFIG = dict(  # cross-attention at 8x8, 4x4 and the middle (at 4x4 alone text is learnt slowly)
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, in_channels=3, out_channels=3,
    sample_size=IMAGE_SIZE)
# Pixel space: DDPM's linear betas. v-prediction weighs the noisy steps (where colour and layout
# are decided) like x0-prediction and the nearly clean ones (the shapes' edges) like
# epsilon-prediction. (An x0-predicting base drew blobs, and classifier-free guidance on x0 leaks
# its overshoot into DDIM's noise estimate.)
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
    "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "v_prediction",
    "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": False,
    "steps_offset": 0, "timestep_spacing": "trailing"}


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
  c.eval_judge = "ipadapter_jax.toy.shapes:judge"  # eval/colour and eval/shape from the pixels
  c.eval_limit = 64
  c.eval_steps = 20
  c.eval_guidance_scale = 1.0  # the toy base follows its text best unguided (docs/toy_world.md)
  c.eval_batch_size = 64
  return c
