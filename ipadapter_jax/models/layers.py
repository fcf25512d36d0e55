"""Linear, convolution and normalisation layers with PyTorch's numerics and a declared dtype policy.

Parameters are stored in `param_dtype` and cast to the compute `dtype` at call time; normalisation
statistics are always computed in float32. Kernels use Flax layouts: Linear [in, out], Conv HWIO.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class AdapterParam(nnx.Param):
  """A trainable IP-Adapter weight (image projection, to_k_ip, to_v_ip).

  A Variable type of its own so that the optimizer, the checkpointer and the exporter select every
  adapter weight with one filter, while the frozen base model stays plain `nnx.Param`.
  """


LAYOUTS = ("NHWC", "NCHW")


def to_nhwc(x, layout: str):
  """An image batch in `layout` (NHWC here, NCHW as diffusers and transformers) -> NHWC."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
  return jnp.transpose(x, (0, 2, 3, 1)) if layout == "NCHW" else x


def from_nhwc(x, layout: str):
  """NHWC -> `layout` (the inverse of `to_nhwc`)."""
  return jnp.transpose(x, (0, 3, 1, 2)) if layout == "NCHW" else x


class ParamKeys:
  """Parameter-initialisation keys fold_in(key, 0), fold_in(key, 1), ... drawn like
  `nnx.Rngs.params()`.

  Large models build their layers with this instead of `nnx.Rngs`: each `nnx.Rngs` draw updates a
  counter Variable, which under `nnx.eval_shape` costs time that grows with the traced program
  (21 s for an abstract SDXL UNet), while this stays pure Python.
  """

  def __init__(self, rngs: nnx.Rngs):
    self._key = rngs.params()
    self._count = 0

  def params(self):
    self._count += 1
    return jax.random.fold_in(self._key, self._count)


# PyTorch's default initialisation (kaiming_uniform with a=sqrt(5)) is
# U(-1/sqrt(fan_in), +1/sqrt(fan_in)).
_torch_default_init = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class Linear(nnx.Module):
  """y = x @ kernel + bias."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    param_type=nnx.Param,
    rngs: nnx.Rngs,
  ):
    self.kernel = param_type(
      _torch_default_init(rngs.params(), (in_features, out_features), param_dtype)
    )
    self.bias = param_type(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Conv2d(nnx.Module):
  """2-D convolution over NHWC inputs with an HWIO kernel and symmetric zero padding."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    shape = (kernel_size, kernel_size, in_channels, out_channels)
    self.kernel = nnx.Param(_torch_default_init(rngs.params(), shape, param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype)) if use_bias else None
    self.stride = stride
    self.padding = padding
    self.dtype = dtype

  def __call__(self, x_BHWC):
    y = jax.lax.conv_general_dilated(
      x_BHWC.astype(self.dtype),
      self.kernel[...].astype(self.dtype),
      window_strides=(self.stride, self.stride),
      padding=((self.padding, self.padding), (self.padding, self.padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Embed(nnx.Module):
  """A lookup table [num_embeddings, features] (PyTorch's nn.Embedding, same layout)."""

  def __init__(
    self,
    num_embeddings: int,
    features: int,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.embedding = nnx.Param(
      jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype)
    )
    self.dtype = dtype

  def __call__(self, ids):
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def _normalise(x, axes, eps):
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)  # biased, as PyTorch's norms
  return (x - mean) * jax.lax.rsqrt(var + eps)


class GroupNorm(nnx.Module):
  """GroupNorm over the channels of an NHWC (or [B, T, C]) tensor, statistics in float32."""

  def __init__(
    self,
    num_groups: int,
    num_channels: int,
    *,
    eps: float = 1e-5,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
  ):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
    self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))
    self.num_groups = num_groups
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    grouped = x.reshape(x.shape[:-1] + (self.num_groups, -1))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # every axis but batch and group
    y = _normalise(grouped, axes, self.eps).reshape(x.shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(
    self,
    num_features: int,
    *,
    eps: float = 1e-5,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    param_type=nnx.Param,
  ):
    self.scale = param_type(jnp.ones((num_features,), param_dtype))
    self.bias = param_type(jnp.zeros((num_features,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    y = _normalise(x, (-1,), self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)
