"""Flax NNX modules: the UNet with decoupled cross-attention and the adapter's image projection."""

from ipadapter_jax.models.attention import ImagePrompt
from ipadapter_jax.models.image_proj import (AdapterConfig, FullFaceProjection, ImageProjection,
                                             Resampler)
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
