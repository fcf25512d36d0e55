"""AutoencoderKL: images <-> latents, with diffusers' module names. NHWC throughout."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.attention import dot_product_attention
from ipadapter_jax.models.config_checks import check_fixed, reject_unknown, require
from ipadapter_jax.models.layers import Conv2d, GroupNorm, Linear, ParamKeys, from_nhwc, to_nhwc
from ipadapter_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

_FIXED_KEYS = {"act_fn": "silu"}
# Read for information only: they describe training or pipeline habits, not this computation.
_IGNORED_KEYS = ("sample_size", "force_upcast", "latents_mean", "latents_std")
_EPS = 1e-6  # every norm inside diffusers' VAE encoder/decoder


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The architecture of an AutoencoderKL; field names are diffusers' config keys."""

  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_diffusers(cls, raw: dict[str, Any], source: str = "vae config") -> "VAEConfig":
    raw = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _IGNORED_KEYS}
    check_fixed(raw, _FIXED_KEYS, source)
    require(raw, ("block_out_channels",), source)
    n = len(raw["block_out_channels"])
    for key, block in (
      ("down_block_types", "DownEncoderBlock2D"),
      ("up_block_types", "UpDecoderBlock2D"),
    ):
      types = raw.pop(key, [block] * n)
      if list(types) != [block] * n:
        raise ValueError(
          f"{source}: '{key}'={types!r} is not supported (only {block!r} blocks, "
          "one per entry of 'block_out_channels')"
        )
    raw["block_out_channels"] = tuple(raw["block_out_channels"])
    reject_unknown(raw, cls, source)
    return cls(**raw)

  def to_diffusers(self) -> dict[str, Any]:
    n = len(self.block_out_channels)
    return {
      "_class_name": "AutoencoderKL",
      **_FIXED_KEYS,
      **dataclasses.asdict(self),
      "block_out_channels": list(self.block_out_channels),
      "down_block_types": ["DownEncoderBlock2D"] * n,
      "up_block_types": ["UpDecoderBlock2D"] * n,
    }


class SpatialSelfAttention(nnx.Module):
  """GroupNorm, single-head self-attention over the H*W positions, output projection, residual."""

  def __init__(self, channels: int, *, groups: int, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.group_norm = GroupNorm(groups, channels, eps=_EPS, **kw)
    self.to_q = Linear(channels, channels, rngs=rngs, **kw)
    self.to_k = Linear(channels, channels, rngs=rngs, **kw)
    self.to_v = Linear(channels, channels, rngs=rngs, **kw)
    self.to_out = Linear(channels, channels, rngs=rngs, **kw)

  def __call__(self, x_BHWC):
    B, H, W, C = x_BHWC.shape
    h_BTC = self.group_norm(x_BHWC).reshape(B, H * W, C)
    q, k, v = (proj(h_BTC)[:, :, None, :] for proj in (self.to_q, self.to_k, self.to_v))
    out_BTC = dot_product_attention(q, k, v)[:, :, 0, :]
    return self.to_out(out_BTC).reshape(B, H, W, C) + x_BHWC


class MidBlock(nnx.Module):
  """diffusers' UNetMidBlock2D without time embedding: resnet, attention, resnet."""

  def __init__(self, channels: int, *, groups: int, add_attention: bool, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List(
      [ResnetBlock2D(channels, channels, None, groups=groups, eps=_EPS, **kw) for _ in range(2)]
    )
    self.attentions = (
      nnx.List([SpatialSelfAttention(channels, groups=groups, **kw)]) if add_attention else None
    )

  def __call__(self, x_BHWC):
    x_BHWC = self.resnets[0](x_BHWC)
    if self.attentions is not None:
      x_BHWC = self.attentions[0](x_BHWC)
    return self.resnets[1](x_BHWC)


class EncoderBlock(nnx.Module):
  """diffusers' DownEncoderBlock2D: resnets, then a stride-2 convolution with (0, 1) padding."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    *,
    num_layers: int,
    groups: int,
    add_downsample: bool,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List(
      [
        ResnetBlock2D(
          in_channels if j == 0 else out_channels, out_channels, None, groups=groups, eps=_EPS, **kw
        )
        for j in range(num_layers)
      ]
    )
    self.downsamplers = (
      nnx.List([Downsample2D(out_channels, padding=0, **kw)]) if add_downsample else None
    )

  def __call__(self, x_BHWC):
    for resnet in self.resnets:
      x_BHWC = resnet(x_BHWC)
    return x_BHWC if self.downsamplers is None else self.downsamplers[0](x_BHWC)


class DecoderBlock(nnx.Module):
  """diffusers' UpDecoderBlock2D: resnets, then nearest x2 upsampling and a convolution."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    *,
    num_layers: int,
    groups: int,
    add_upsample: bool,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List(
      [
        ResnetBlock2D(
          in_channels if j == 0 else out_channels, out_channels, None, groups=groups, eps=_EPS, **kw
        )
        for j in range(num_layers)
      ]
    )
    self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

  def __call__(self, x_BHWC):
    for resnet in self.resnets:
      x_BHWC = resnet(x_BHWC)
    return x_BHWC if self.upsamplers is None else self.upsamplers[0](x_BHWC)


class Encoder(nnx.Module):
  """Image [B, H, W, 3] -> 2 x latent_channels moments at 1/2^(n-1) resolution."""

  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    chans, n, groups = cfg.block_out_channels, len(cfg.block_out_channels), cfg.norm_num_groups
    self.conv_in = Conv2d(cfg.in_channels, chans[0], 3, padding=1, **kw)
    self.down_blocks = nnx.List(
      [
        EncoderBlock(
          chans[max(i - 1, 0)],
          chans[i],
          num_layers=cfg.layers_per_block,
          groups=groups,
          add_downsample=i < n - 1,
          **kw,
        )
        for i in range(n)
      ]
    )
    self.mid_block = MidBlock(
      chans[-1], groups=groups, add_attention=cfg.mid_block_add_attention, **kw
    )
    self.conv_norm_out = GroupNorm(
      groups, chans[-1], eps=_EPS, dtype=dtype, param_dtype=param_dtype
    )
    self.conv_out = Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1, **kw)

  def __call__(self, x_BHWC):
    x_BHWC = self.conv_in(x_BHWC)
    for block in self.down_blocks:
      x_BHWC = block(x_BHWC)
    x_BHWC = self.mid_block(x_BHWC)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x_BHWC)))


class Decoder(nnx.Module):
  """Latents [B, h, w, latent_channels] -> image [B, H, W, out_channels]."""

  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    rev, n, groups = cfg.block_out_channels[::-1], len(cfg.block_out_channels), cfg.norm_num_groups
    self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, padding=1, **kw)
    self.mid_block = MidBlock(
      rev[0], groups=groups, add_attention=cfg.mid_block_add_attention, **kw
    )
    self.up_blocks = nnx.List(
      [
        DecoderBlock(
          rev[max(i - 1, 0)],
          rev[i],
          num_layers=cfg.layers_per_block + 1,
          groups=groups,
          add_upsample=i < n - 1,
          **kw,
        )
        for i in range(n)
      ]
    )
    self.conv_norm_out = GroupNorm(groups, rev[-1], eps=_EPS, dtype=dtype, param_dtype=param_dtype)
    self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, padding=1, **kw)

  def __call__(self, z_BHWC):
    x_BHWC = self.mid_block(self.conv_in(z_BHWC))
    for block in self.up_blocks:
      x_BHWC = block(x_BHWC)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x_BHWC)))


class AutoencoderKL(nnx.Module):
  """The Stable Diffusion VAE. Images are in [-1, 1]; layout NHWC (or NCHW via `layout`)."""

  def __init__(
    self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    rngs = ParamKeys(rngs)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    moments = 2 * config.latent_channels
    self.config = config
    self.encoder = Encoder(config, **kw)
    self.decoder = Decoder(config, **kw)
    self.quant_conv = Conv2d(moments, moments, 1, **kw) if config.use_quant_conv else None
    self.post_quant_conv = (
      Conv2d(config.latent_channels, config.latent_channels, 1, **kw)
      if config.use_post_quant_conv
      else None
    )
    self.dtype = dtype

  def encode(self, images, *, layout: str = "NHWC"):
    """Images -> the posterior's (mean, logvar), each [B, h, w, latent_channels] (same layout)."""
    x_BHWC = to_nhwc(images, layout).astype(self.dtype)
    moments = self.encoder(x_BHWC)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    return from_nhwc(mean, layout), from_nhwc(logvar, layout)

  def decode(self, latents, *, layout: str = "NHWC"):
    """Unscaled latents -> images in about [-1, 1]."""
    z_BHWC = to_nhwc(latents, layout).astype(self.dtype)
    if self.post_quant_conv is not None:
      z_BHWC = self.post_quant_conv(z_BHWC)
    return from_nhwc(self.decoder(z_BHWC), layout)


def scale_latents(latents, config: VAEConfig):
  """The posterior's latents -> the diffusion model's: (z - shift_factor) * scaling_factor."""
  return (latents - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(latents, config: VAEConfig):
  """The diffusion model's latents -> the latents the decoder takes (scale_latents' inverse)."""
  return latents / config.scaling_factor + (config.shift_factor or 0.0)


def sample_posterior(mean, logvar, key):
  """A draw from N(mean, exp(logvar)), in float32."""
  std = jnp.exp(0.5 * logvar.astype(jnp.float32))
  return mean.astype(jnp.float32) + std * jax.random.normal(key, mean.shape, jnp.float32)
