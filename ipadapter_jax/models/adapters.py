"""Image prompts from adapter weights: the shared encoding, and adapters beyond the UNet's own.

A UNet built with an adapter carries that adapter's weights (`image_proj`, each cross-attention
layer's `to_k_ip`/`to_v_ip`). Any further adapter used at the same time (a Plus file beside a
basic one, a face adapter beside a style adapter) is an `IPAdapter`: the same weights, held
outside the UNet, which only ever needs their keys and values. Both encode image features into
an `ImagePrompt` through `encode_image_prompt` below, so they cannot disagree.
Shape letters as in `ipadapter_jax.models` (docs/conventions.md).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.attention import ImagePrompt
from ipadapter_jax.models.image_proj import AdapterConfig, make_image_projection
from ipadapter_jax.models.layers import AdapterParam, Linear


def layer_scales(scale, num_layers: int):
  """A scalar or one value per decoupled layer (checkpoint order) -> [num_layers] float32."""
  scale = jnp.asarray(scale, jnp.float32)
  if scale.shape not in ((), (num_layers,)):
    raise ValueError(
      f"adapter scale must be a scalar or have {num_layers} entries "
      f"(one per cross-attention layer), got shape {scale.shape}"
    )
  return jnp.broadcast_to(scale, (num_layers,))


def encode_image_prompt(
  image_proj,
  layers: Sequence,
  image_features,
  scale=1.0,
  *,
  num_images: int = 1,
  weights=None,
  masks=None,
  dtype=jnp.float32,
) -> ImagePrompt:
  """Image features -> image tokens -> every layer's keys/values; once per generation.

  `image_features` has num_images rows per example ([B * I, E] or [B * I, T, E], each example's
  images together); the I images' tokens are concatenated per example. `layers` are the
  decoupled layers in checkpoint order (each with `image_kv`); `weights` [I] and `masks` (per
  layer [B or 1, T, I]) are passed through to the `ImagePrompt`.
  """
  tokens_BND = image_proj(image_features.astype(dtype))
  tokens_BND = tokens_BND.reshape((-1, num_images * tokens_BND.shape[1], tokens_BND.shape[2]))
  if weights is not None:
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (num_images,):
      raise ValueError(f"image weights have shape {weights.shape}, expected ({num_images},)")
  return ImagePrompt(
    kv=tuple(layer.image_kv(tokens_BND) for layer in layers),
    scale=layer_scales(scale, len(layers)),
    weights=weights,
    masks=masks,
  )


class ImageKeyValue(nnx.Module):
  """One cross-attention layer's `to_k_ip`/`to_v_ip` for an adapter outside the UNet."""

  def __init__(self, context_dim: int, inner: int, heads: int, *, dtype, rngs: nnx.Rngs):
    kw = dict(
      use_bias=False, dtype=dtype, param_dtype=jnp.float32, param_type=AdapterParam, rngs=rngs
    )
    self.to_k_ip = Linear(context_dim, inner, **kw)
    self.to_v_ip = Linear(context_dim, inner, **kw)
    self.heads = heads

  def image_kv(self, image_tokens_BND):
    split = lambda x: x.reshape(x.shape[:-1] + (self.heads, -1))
    return split(self.to_k_ip(image_tokens_BND)), split(self.to_v_ip(image_tokens_BND))


class IPAdapter(nnx.Module):
  """An adapter's projection and per-layer image keys/values, for a UNet of a given topology.

  `layers` gives (inner width, heads) of each cross-attention layer in checkpoint order
  (`weights.load_extra_adapter` reads them from the UNet it is loaded for).
  """

  def __init__(
    self,
    config: AdapterConfig,
    context_dim: int,
    layers: Sequence[tuple[int, int]],
    *,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if config.attention != "decoupled":
      raise ValueError("only decoupled adapters can be combined with others")
    self.adapter_config = config
    self.context_dim = context_dim
    self.image_proj = make_image_projection(config, context_dim, dtype=dtype, rngs=rngs)
    self.layers = nnx.List(
      [ImageKeyValue(context_dim, inner, heads, dtype=dtype, rngs=rngs) for inner, heads in layers]
    )
    self.dtype = dtype

  def decoupled_layers(self) -> list[ImageKeyValue]:
    return list(self.layers)

  def encode_image_prompt(self, image_features, scale=1.0, **kw) -> ImagePrompt:
    """As `UNet2DConditionModel.encode_image_prompt`, with this adapter's weights."""
    return encode_image_prompt(
      self.image_proj, self.decoupled_layers(), image_features, scale, dtype=self.dtype, **kw
    )
