"""Flax NNX modules: the UNet with decoupled cross-attention and the adapter's image projection.

Tensor names end in one letter per axis (docs/conventions.md), the same letters everywhere:
  B batch; T tokens of the sequence being processed (queries, flattened H*W positions, token ids);
  S context tokens (keys/values); N image tokens (and the Resampler's latents);
  H heads, K head dim; D width of a token sequence; C channels of an image or feature map;
  H, W height and width in an image layout (a name with W: BHWC, BHWD, HWC);
  E embedding width (time embedding, CLIP features the adapter reads); P projection width;
  F other features (sinusoidal timestep features); 1 a size-1 broadcasting axis.
"""

from ipadapter_jax.models.adapters import IPAdapter
from ipadapter_jax.models.attention import ImagePrompt
from ipadapter_jax.models.image_proj import (
  AdapterConfig,
  FullFaceProjection,
  ImageProjection,
  Resampler,
)
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
