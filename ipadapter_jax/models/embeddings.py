"""Sinusoidal timestep features and the MLP that turns them into the UNet's time embedding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.layers import Linear


def timestep_features(
  t_B, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
):
  """Sinusoidal features [B, dim] of (possibly fractional) timesteps, in float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles_BF = t_B.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles_BF), jnp.cos(angles_BF)
  feats = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    feats = jnp.pad(feats, ((0, 0), (0, 1)))
  return feats


class TimestepEmbedding(nnx.Module):
  """linear_1 -> SiLU -> linear_2."""

  def __init__(self, in_features: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = Linear(in_features, dim, **kw)
    self.linear_2 = Linear(dim, dim, **kw)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


def conditioning_embedding(
  cfg,
  time_embedding: TimestepEmbedding,
  add_embedding,
  timesteps,
  batch: int,
  dtype,
  *,
  text_embeds=None,
  time_ids=None,
  owner: str = "UNet",
):
  """The time embedding [B, E] of a UNet-like model (UNet, ControlNet), plus SDXL's added
  embedding of the pooled text and the size/crop ids when `add_embedding` exists. `cfg` has
  block_out_channels, flip_sin_to_cos, freq_shift and addition_time_embed_dim."""
  t_B = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
  feats_BF = timestep_features(
    t_B, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
  )
  temb_BE = time_embedding(feats_BF.astype(dtype))
  if add_embedding is None:
    return temb_BE
  if text_embeds is None or time_ids is None:
    raise ValueError(f"this {owner} uses SDXL conditioning: pass text_embeds and time_ids")
  time_feats = timestep_features(
    jnp.reshape(time_ids, (-1,)),
    cfg.addition_time_embed_dim,
    flip_sin_to_cos=cfg.flip_sin_to_cos,
    freq_shift=cfg.freq_shift,
  ).reshape(batch, -1)
  added = jnp.concatenate([text_embeds.astype(dtype), time_feats.astype(dtype)], -1)
  return temb_BE + add_embedding(added)
