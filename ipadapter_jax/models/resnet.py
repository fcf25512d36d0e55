"""ResNet blocks with a time embedding, and the UNet's down/up sampling layers (NHWC)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.layers import Conv2d, GroupNorm, Linear


class ResnetBlock2D(nnx.Module):
  """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-conv, + (shortcut) input.

  With `temb_channels=None` (the VAE) there is no time embedding.
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    temb_channels: int | None,
    *,
    groups: int,
    eps: float,
    output_scale_factor: float = 1.0,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = GroupNorm(groups, in_channels, eps=eps, **kw)
    self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, rngs=rngs, **kw)
    self.time_emb_proj = (
      Linear(temb_channels, out_channels, rngs=rngs, **kw) if temb_channels is not None else None
    )
    self.norm2 = GroupNorm(groups, out_channels, eps=eps, **kw)
    self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, rngs=rngs, **kw)
    self.conv_shortcut = (
      Conv2d(in_channels, out_channels, 1, rngs=rngs, **kw) if in_channels != out_channels else None
    )
    self.output_scale_factor = output_scale_factor

  def __call__(self, x_BHWC, temb_BE=None):
    h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb_BE))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x_BHWC if self.conv_shortcut is None else self.conv_shortcut(x_BHWC)
    out = skip + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nnx.Module):
  """3x3 convolution with stride 2; padding 0 means diffusers' asymmetric (0, 1) zero padding."""

  def __init__(self, channels: int, *, padding: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = Conv2d(
      channels,
      channels,
      3,
      stride=2,
      padding=padding,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.pad_right = padding == 0

  def __call__(self, x_BHWC):
    if self.pad_right:
      x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x_BHWC)


def resize_nearest(x_BHWC, size: tuple[int, int]):
  """Nearest-neighbour resize with PyTorch's index rule (src = floor(dst * in / out))."""
  (h_in, w_in), (h_out, w_out) = x_BHWC.shape[1:3], size
  rows = (jnp.arange(h_out) * h_in) // h_out
  cols = (jnp.arange(w_out) * w_in) // w_out
  return x_BHWC[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
  """Nearest-neighbour upsampling (x2, or to the skip connection's size) then a 3x3 convolution."""

  def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = Conv2d(
      channels, channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x_BHWC, size: tuple[int, int] | None = None):
    _, H, W, _ = x_BHWC.shape
    if size is None or tuple(size) == (2 * H, 2 * W):
      x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
    else:
      x_BHWC = resize_nearest(x_BHWC, size)
    return self.conv(x_BHWC)
