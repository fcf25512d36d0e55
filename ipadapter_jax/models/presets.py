"""The diffusers `unet/config.json` of released Stable Diffusion models, for building them by shape.

Real weights always come with their own config.json; these let a model be built abstractly
(`nnx.eval_shape`) for shape checks, memory estimates and benchmarks without any download.
"""

_SD_BLOCKS = dict(
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2, in_channels=4, out_channels=4, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", center_input_sample=False,
)

SD15_UNET = dict(_SD_BLOCKS, attention_head_dim=8, cross_attention_dim=768, sample_size=64)

SD21_UNET = dict(_SD_BLOCKS, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 use_linear_projection=True, upcast_attention=True, sample_size=96)

SDXL_UNET = dict(
    _SD_BLOCKS,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048, use_linear_projection=True, upcast_attention=None,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, sample_size=128,
)
