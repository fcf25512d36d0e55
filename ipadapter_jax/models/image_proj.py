"""The adapter's image projection: CLIP image embedding -> N image tokens of the UNet's context width."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.layers import AdapterParam, LayerNorm, Linear


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Shape of an IP-Adapter: `num_tokens` image tokens projected from a CLIP embedding of `embed_dim`."""
  num_tokens: int = 4
  embed_dim: int = 1024

  def __post_init__(self):
    if self.num_tokens < 1 or self.embed_dim < 1:
      raise ValueError(f"AdapterConfig: num_tokens and embed_dim must be positive, got {self}")


class ImageProjection(nnx.Module):
  """Linear(E -> N*C) reshaped row-major to N tokens, then LayerNorm(C) (the basic adapter)."""

  def __init__(self, embed_dim: int, context_dim: int, num_tokens: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=jnp.float32, param_type=AdapterParam)
    self.proj = Linear(embed_dim, num_tokens * context_dim, rngs=rngs, **kw)
    self.norm = LayerNorm(context_dim, **kw)
    self.num_tokens = num_tokens

  def __call__(self, image_embeds_BE):
    tokens_BNC = self.proj(image_embeds_BE).reshape(image_embeds_BE.shape[0], self.num_tokens, -1)
    return self.norm(tokens_BNC)
