"""The adapter's image projections: CLIP image features -> image tokens of the UNet's context width.

Three variants with the official module names (so weight conversion is a plain table), each
ending in image tokens [B, N, D] of the UNet's cross-attention width D:
  basic      ImageProjection: image_embeds [B, E] -> Linear -> N tokens -> LayerNorm.
  plus       Resampler: hidden_states[-2] [B, T, E] -> a Perceiver over N learned latents.
  full_face  FullFaceProjection: hidden_states[-2] [B, T, E] -> MLP + LayerNorm per token (N = T).
Shape letters as in `ipadapter_jax.models` (docs/conventions.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.attention import dot_product_attention
from ipadapter_jax.models.layers import AdapterParam, LayerNorm, Linear

KINDS = ("basic", "plus", "full_face")


ATTENTIONS = ("decoupled", "simple")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """The shape of an IP-Adapter's image projection.

  `embed_dim` is E: the width of CLIP `image_embeds` (basic) or of the vision tower's hidden
  states (plus, full_face). `num_tokens` is N for basic and plus; full_face makes one token per
  input token. The Resampler fields apply to plus only (official: depth 4, heads of 64).
  """

  num_tokens: int = 4
  embed_dim: int = 1024
  kind: str = "basic"
  resampler_dim: int | None = None  # default: the UNet's cross_attention_dim
  resampler_depth: int = 4
  resampler_head_dim: int = 64
  resampler_heads: int | None = None  # default: resampler_dim // resampler_head_dim
  resampler_ff_mult: int = 4
  # "decoupled" (IP-Adapter): the image tokens get their own softmax. "simple" (the paper's
  # section 4.4.1 baseline): they join the text tokens in one softmax, same weights otherwise.
  attention: str = "decoupled"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"AdapterConfig: kind must be one of {KINDS}, got {self.kind!r}")
    if self.attention not in ATTENTIONS:
      raise ValueError(
        f"AdapterConfig: attention must be one of {ATTENTIONS}, got {self.attention!r}"
      )
    if self.num_tokens < 1 or self.embed_dim < 1:
      raise ValueError(f"AdapterConfig: num_tokens and embed_dim must be positive, got {self}")

  @property
  def image_features(self) -> str:
    """What the projection reads: "image_embeds" (basic) or the vision tower's "hidden_states"
    (plus, full_face; their penultimate layer)."""
    return "image_embeds" if self.kind == "basic" else "hidden_states"


class GELU(nnx.Module):
  """The exact (erf) GELU as a module, so Sequential-style indices match PyTorch's."""

  def __call__(self, x):
    return jax.nn.gelu(x, approximate=False)


def _adapter_kw(dtype):
  return dict(dtype=dtype, param_dtype=jnp.float32, param_type=AdapterParam)


class ImageProjection(nnx.Module):
  """Linear(E -> N*D) reshaped row-major to N tokens, then LayerNorm(D) (the basic adapter)."""

  def __init__(
    self, embed_dim: int, context_dim: int, num_tokens: int, *, dtype=jnp.float32, rngs: nnx.Rngs
  ):
    kw = _adapter_kw(dtype)
    self.proj = Linear(embed_dim, num_tokens * context_dim, rngs=rngs, **kw)
    self.norm = LayerNorm(context_dim, **kw)
    self.num_tokens = num_tokens

  def __call__(self, image_embeds_BE):
    B = image_embeds_BE.shape[0]
    image_tokens_BND = self.proj(image_embeds_BE).reshape(B, self.num_tokens, -1)
    return self.norm(image_tokens_BND)


class PerceiverAttention(nnx.Module):
  """Latents attend to [image features ; latents]; to_kv's first half is K; no biases."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, rngs):
    kw = _adapter_kw(dtype)
    inner = heads * head_dim
    self.norm1 = LayerNorm(dim, **kw)
    self.norm2 = LayerNorm(dim, **kw)
    self.to_q = Linear(dim, inner, use_bias=False, rngs=rngs, **kw)
    self.to_kv = Linear(dim, 2 * inner, use_bias=False, rngs=rngs, **kw)
    self.to_out = Linear(inner, dim, use_bias=False, rngs=rngs, **kw)
    self.heads = heads

  def __call__(self, x_BTD, latents_BND):
    x_BTD, latents_BND = self.norm1(x_BTD), self.norm2(latents_BND)
    split = lambda y: y.reshape(y.shape[:-1] + (self.heads, -1))
    context_BSD = jnp.concatenate([x_BTD, latents_BND], axis=1)  # S = T + N
    k_BSHK, v_BSHK = (split(y) for y in jnp.split(self.to_kv(context_BSD), 2, axis=-1))
    out_BNHK = dot_product_attention(split(self.to_q(latents_BND)), k_BSHK, v_BSHK)
    return self.to_out(out_BNHK.reshape(latents_BND.shape[:-1] + (-1,)))


class Resampler(nnx.Module):
  """IP-Adapter Plus: N learned latents read the image features through Perceiver layers.

  `layers[j]` is [PerceiverAttention, [LayerNorm, Linear, GELU, Linear]] as in the official file
  (`layers.{j}.0.*`, `layers.{j}.1.{0,1,3}.*`).
  """

  def __init__(
    self,
    embed_dim: int,
    context_dim: int,
    config: AdapterConfig,
    *,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = _adapter_kw(dtype)
    dim = config.resampler_dim or context_dim
    heads = config.resampler_heads or dim // config.resampler_head_dim
    hidden = config.resampler_ff_mult * dim
    self.latents = AdapterParam(
      jax.random.normal(rngs.params(), (1, config.num_tokens, dim), jnp.float32) / dim**0.5
    )
    self.proj_in = Linear(embed_dim, dim, rngs=rngs, **kw)
    self.layers = nnx.List(
      [
        nnx.List(
          [
            PerceiverAttention(dim, heads, config.resampler_head_dim, dtype=dtype, rngs=rngs),
            nnx.List(
              [
                LayerNorm(dim, **kw),
                Linear(dim, hidden, use_bias=False, rngs=rngs, **kw),
                GELU(),
                Linear(hidden, dim, use_bias=False, rngs=rngs, **kw),
              ]
            ),
          ]
        )
        for _ in range(config.resampler_depth)
      ]
    )
    self.proj_out = Linear(dim, context_dim, rngs=rngs, **kw)
    self.norm_out = LayerNorm(context_dim, **kw)
    self.dtype = dtype

  def __call__(self, features_BTE):
    x_BTD = self.proj_in(features_BTE)
    latents_1ND = self.latents[...].astype(self.dtype)
    latents_BND = jnp.broadcast_to(latents_1ND, (x_BTD.shape[0],) + latents_1ND.shape[1:])
    for attention, feed_forward in self.layers:
      latents_BND = attention(x_BTD, latents_BND) + latents_BND
      y = latents_BND
      for layer in feed_forward:
        y = layer(y)
      latents_BND = y + latents_BND
    return self.norm_out(self.proj_out(latents_BND))


class FullFaceProjection(nnx.Module):
  """IP-Adapter Full-face: `proj` = [Linear(E -> E), GELU, Linear(E -> D), LayerNorm(D)] per
  token."""

  def __init__(self, embed_dim: int, context_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    kw = _adapter_kw(dtype)
    self.proj = nnx.List(
      [
        Linear(embed_dim, embed_dim, rngs=rngs, **kw),
        GELU(),
        Linear(embed_dim, context_dim, rngs=rngs, **kw),
        LayerNorm(context_dim, **kw),
      ]
    )

  def __call__(self, features_BTE):
    x = features_BTE  # E wide, then D: one name cannot carry both suffixes
    for layer in self.proj:
      x = layer(x)
    return x


def make_image_projection(
  config: AdapterConfig, context_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs
):
  """The projection module of `config.kind`."""
  if config.kind == "plus":
    return Resampler(config.embed_dim, context_dim, config, dtype=dtype, rngs=rngs)
  if config.kind == "full_face":
    return FullFaceProjection(config.embed_dim, context_dim, dtype=dtype, rngs=rngs)
  return ImageProjection(config.embed_dim, context_dim, config.num_tokens, dtype=dtype, rngs=rngs)
