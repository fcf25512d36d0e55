"""The diffusers `unet/config.json` of released Stable Diffusion models, for building them by shape.

Real weights always come with their own config.json; these let a model be built abstractly
(`nnx.eval_shape`) for shape checks, memory estimates and benchmarks without any download.
"""

_SD_BLOCKS = dict(
  block_out_channels=[320, 640, 1280, 1280],
  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
  layers_per_block=2,
  in_channels=4,
  out_channels=4,
  norm_num_groups=32,
  norm_eps=1e-5,
  flip_sin_to_cos=True,
  freq_shift=0,
  downsample_padding=1,
  mid_block_scale_factor=1,
  act_fn="silu",
  center_input_sample=False,
)

SD15_UNET = dict(_SD_BLOCKS, attention_head_dim=8, cross_attention_dim=768, sample_size=64)

SD21_UNET = dict(
  _SD_BLOCKS,
  attention_head_dim=[5, 10, 20, 20],
  cross_attention_dim=1024,
  use_linear_projection=True,
  upcast_attention=True,
  sample_size=96,
)

SDXL_UNET = dict(
  _SD_BLOCKS,
  block_out_channels=[320, 640, 1280],
  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  attention_head_dim=[5, 10, 20],
  transformer_layers_per_block=[1, 2, 10],
  cross_attention_dim=2048,
  use_linear_projection=True,
  upcast_attention=None,
  addition_embed_type="text_time",
  addition_time_embed_dim=256,
  projection_class_embeddings_input_dim=2816,
  sample_size=128,
)

SD_VAE = dict(
  block_out_channels=[128, 256, 512, 512],
  layers_per_block=2,
  in_channels=3,
  out_channels=3,
  latent_channels=4,
  norm_num_groups=32,
  act_fn="silu",
  scaling_factor=0.18215,
  down_block_types=["DownEncoderBlock2D"] * 4,
  up_block_types=["UpDecoderBlock2D"] * 4,
  sample_size=512,
)

# transformers config.json contents of the CLIP towers Stable Diffusion and IP-Adapter use.
CLIP_L14_TEXT = dict(  # SD1.x text encoder; SDXL's first
  vocab_size=49408,
  hidden_size=768,
  intermediate_size=3072,
  num_hidden_layers=12,
  num_attention_heads=12,
  max_position_embeddings=77,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
  bos_token_id=0,
  eos_token_id=2,
  projection_dim=768,
)
OPENCLIP_BIGG14_TEXT = dict(  # SDXL's second text encoder (with projection)
  vocab_size=49408,
  hidden_size=1280,
  intermediate_size=5120,
  num_hidden_layers=32,
  num_attention_heads=20,
  max_position_embeddings=77,
  hidden_act="gelu",
  layer_norm_eps=1e-5,
  bos_token_id=0,
  eos_token_id=2,
  projection_dim=1280,
)
OPENCLIP_H14_VISION = dict(  # IP-Adapter's image encoder (models/image_encoder)
  hidden_size=1280,
  intermediate_size=5120,
  num_hidden_layers=32,
  num_attention_heads=16,
  num_channels=3,
  image_size=224,
  patch_size=14,
  hidden_act="gelu",
  layer_norm_eps=1e-5,
  projection_dim=1024,
)
