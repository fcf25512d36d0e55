"""Sinusoidal timestep features and the MLP that turns them into the UNet's time embedding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.layers import Linear


def timestep_features(t_B, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                      max_period: float = 10000.0):
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
