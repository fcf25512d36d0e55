"""T2I-Adapter (diffusers' `T2IAdapter`): a small convolutional network that turns a control image
(sketch, depth, canny edges...) into one feature map per UNet level, added to the UNet's down path.

Module names follow diffusers' state dict (`adapter.conv_in`, `adapter.body.{i}.resnets.{j}...`),
so weight conversion is the mechanical table of `weights.tables`. Activations are NHWC inside.

Where diffusers' UNet adds each feature map (`down_intrablock_additional_residuals`, popped in
order): a CrossAttnDownBlock2D adds it to the output of its last resnet + attention pair, before
its downsampler; a DownBlock2D adds it to its output, after its downsampler (if any); in both cases
the skip connection the up path reads carries it too. A feature map left over after the down
blocks is added to the mid block's output when its shape matches (SDXL's fourth map).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.models.config_checks import reject_unknown, require
from ipadapter_jax.models.layers import Conv2d, ParamKeys, from_nhwc, to_nhwc

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class T2IAdapterConfig:
  """The architecture of a T2IAdapter; field names are diffusers' config keys."""

  in_channels: int = 3
  channels: tuple[int, ...] = (320, 640, 1280, 1280)
  num_res_blocks: int = 2
  downscale_factor: int = 8
  adapter_type: str = "full_adapter"

  def __post_init__(self):
    if self.adapter_type not in ADAPTER_TYPES:
      raise ValueError(
        f"'adapter_type'={self.adapter_type!r} is not supported (supported: {ADAPTER_TYPES})"
      )
    for key in ("in_channels", "downscale_factor"):
      if not _positive_int(getattr(self, key)):
        raise ValueError(f"'{key}' must be a positive integer, got {getattr(self, key)!r}")
    n = self.num_res_blocks
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
      raise ValueError(f"'num_res_blocks' must be a non-negative integer, got {n!r}")
    if not isinstance(self.channels, tuple) or not self.channels:
      raise ValueError(f"'channels' must be a non-empty list, got {self.channels!r}")
    for i, c in enumerate(self.channels):
      if not _positive_int(c):
        raise ValueError(f"'channels'[{i}] must be a positive integer, got {c!r}")
      if self.adapter_type == "light_adapter" and c < 4:
        raise ValueError(
          f"'channels'[{i}]={c} is too small for a light_adapter (its blocks "
          "work at a quarter of the channels)"
        )
    if self.adapter_type == "full_adapter_xl":
      # diffusers builds levels 3+ with in_channels = channels[i], which only runs when equal
      for i in range(3, len(self.channels)):
        if self.channels[i] != self.channels[i - 1]:
          raise ValueError(
            f"'channels'[{i}]={self.channels[i]} must equal 'channels'[{i - 1}]="
            f"{self.channels[i - 1]} in a full_adapter_xl"
          )

  @classmethod
  def from_diffusers(
    cls, raw: dict[str, Any], source: str = "t2i adapter config"
  ) -> "T2IAdapterConfig":
    """Parses a diffusers adapter `config.json` dict; unknown or unsupported settings raise.

    `in_channels` and `num_res_blocks` default as in diffusers (3 and 2); the other keys decide
    where the feature maps go and must be given.
    """
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    require(raw, ("channels", "downscale_factor", "adapter_type"), source)
    reject_unknown(raw, cls, source)
    if isinstance(raw["channels"], list):
      raw["channels"] = tuple(raw["channels"])
    try:
      return cls(**raw)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  def to_diffusers(self) -> dict[str, Any]:
    """A diffusers `config.json` dict describing this architecture."""
    out = {"_class_name": "T2IAdapter", **dataclasses.asdict(self)}
    out["channels"] = list(self.channels)
    return out

  @property
  def levels(self) -> tuple["FeatureLevel", ...]:
    """Each feature map's channels and downscale (relative to the input image), in output order."""
    f, ch = self.downscale_factor, self.channels
    if self.adapter_type == "full_adapter":
      return tuple(FeatureLevel(i, c, f * 2**i) for i, c in enumerate(ch))
    if self.adapter_type == "full_adapter_xl":  # one downsampling block only, at level 2
      return tuple(FeatureLevel(i, c, f * (2 if i >= 2 else 1)) for i, c in enumerate(ch))
    # light_adapter: one block per entry of `channels`, then one more downsampling block
    return tuple(FeatureLevel(i, c, f * 2**i) for i, c in enumerate(ch)) + (
      FeatureLevel(len(ch) - 1, ch[-1], f * 2 ** len(ch)),
    )

  @property
  def total_downscale_factor(self) -> int:
    """diffusers' `total_downscale_factor` (only MultiAdapter reads it); for an XL adapter it is
    2 * downscale_factor even with fewer than three levels, which pool nothing."""
    if self.adapter_type == "full_adapter_xl":
      return 2 * self.downscale_factor
    return max(level.downscale for level in self.levels)


class FeatureLevel(NamedTuple):
  """One output feature map: `channels[channel_index]` channels at 1/`downscale` of the image."""

  channel_index: int
  channels: int
  downscale: int


def pixel_unshuffle(x_BHWC, factor: int):
  """PyTorch's nn.PixelUnshuffle on NHWC data: [B, H, W, C] -> [B, H/r, W/r, C*r*r].

  The output channel c*r*r + i*r + j holds input channel c at offset (i, j) inside each r x r
  cell, PyTorch's order, so that conv_in's weights apply unchanged.
  """
  B, H, W, C = x_BHWC.shape
  r = factor
  x = x_BHWC.reshape(B, H // r, r, W // r, r, C)  # b, h, i, w, j, c
  x = jnp.transpose(x, (0, 1, 3, 5, 2, 4))  # b, h, w, c, i, j
  return x.reshape(B, H // r, W // r, C * r * r)


def avg_pool_2x2_ceil(x_BHWC):
  """PyTorch's AvgPool2d(2, stride=2, ceil_mode=True): an edge window cut short by an odd size
  averages only the pixels it covers. Sums are taken in float32."""
  B, H, W, C = x_BHWC.shape
  x = x_BHWC.astype(jnp.float32)
  if H % 2 or W % 2:
    x = jnp.pad(x, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
  Ho, Wo = -(-H // 2), -(-W // 2)
  sums = x.reshape(B, Ho, 2, Wo, 2, C).sum(axis=(2, 4))
  rows = np.minimum(2, H - 2 * np.arange(Ho))
  cols = np.minimum(2, W - 2 * np.arange(Wo))
  count = (rows[:, None] * cols[None, :]).astype(np.float32)[None, :, :, None]
  return (sums / count).astype(x_BHWC.dtype)


class AdapterResnetBlock(nnx.Module):
  """x + block2(relu(block1(x))); block2 is 1x1 in the full adapters, 3x3 in the light one."""

  def __init__(self, channels: int, *, light: bool, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.block1 = Conv2d(channels, channels, 3, padding=1, **kw)
    k = 3 if light else 1
    self.block2 = Conv2d(channels, channels, k, padding=k // 2, **kw)

  def __call__(self, x_BHWC):
    return x_BHWC + self.block2(jax.nn.relu(self.block1(x_BHWC)))


class AdapterBlock(nnx.Module):
  """diffusers' AdapterBlock: an optional 2x2 average pool, a 1x1 conv when the width changes,
  then the resnets."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    num_res_blocks: int,
    *,
    down: bool,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.down = down
    self.in_conv = (
      Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
    )
    self.resnets = nnx.List(
      [AdapterResnetBlock(out_channels, light=False, **kw) for _ in range(num_res_blocks)]
    )

  def __call__(self, x_BHWC):
    if self.down:
      x_BHWC = avg_pool_2x2_ceil(x_BHWC)
    if self.in_conv is not None:
      x_BHWC = self.in_conv(x_BHWC)
    for resnet in self.resnets:
      x_BHWC = resnet(x_BHWC)
    return x_BHWC


class LightAdapterBlock(nnx.Module):
  """diffusers' LightAdapterBlock: optional pool, 1x1 in to a quarter width, resnets, 1x1 out."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    num_res_blocks: int,
    *,
    down: bool,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    mid = out_channels // 4
    self.down = down
    self.in_conv = Conv2d(in_channels, mid, 1, **kw)
    self.resnets = nnx.List(
      [AdapterResnetBlock(mid, light=True, **kw) for _ in range(num_res_blocks)]
    )
    self.out_conv = Conv2d(mid, out_channels, 1, **kw)

  def __call__(self, x_BHWC):
    if self.down:
      x_BHWC = avg_pool_2x2_ceil(x_BHWC)
    x_BHWC = self.in_conv(x_BHWC)
    for resnet in self.resnets:
      x_BHWC = resnet(x_BHWC)
    return self.out_conv(x_BHWC)


class FullAdapter(nnx.Module):
  """diffusers' FullAdapter and FullAdapterXL: pixel unshuffle, conv_in, one block per level."""

  def __init__(self, cfg: T2IAdapterConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch, n = cfg.channels, cfg.num_res_blocks
    self.conv_in = Conv2d(cfg.in_channels * cfg.downscale_factor**2, ch[0], 3, padding=1, **kw)
    if cfg.adapter_type == "full_adapter":
      plan = [(ch[0], ch[0], False)] + [(ch[i - 1], ch[i], True) for i in range(1, len(ch))]
    else:  # the XL layout: levels 0 and 1 at the same size, one downsampling block at level 2
      plan = [(ch[i - 1] if i in (1, 2) else ch[i], ch[i], i == 2) for i in range(len(ch))]
    self.body = nnx.List([AdapterBlock(cin, cout, n, down=down, **kw) for cin, cout, down in plan])

  def __call__(self, x_BHWC):
    x_BHWC = self.conv_in(x_BHWC)
    features = []
    for block in self.body:
      x_BHWC = block(x_BHWC)
      features.append(x_BHWC)
    return features


class LightAdapter(nnx.Module):
  """diffusers' LightAdapter: pixel unshuffle, then len(channels) + 1 light blocks."""

  def __init__(self, cfg: T2IAdapterConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch, n = cfg.channels, cfg.num_res_blocks
    plan = (
      [(cfg.in_channels * cfg.downscale_factor**2, ch[0], False)]
      + [(ch[i], ch[i + 1], True) for i in range(len(ch) - 1)]
      + [(ch[-1], ch[-1], True)]
    )
    self.body = nnx.List(
      [LightAdapterBlock(cin, cout, n, down=down, **kw) for cin, cout, down in plan]
    )

  def __call__(self, x_BHWC):
    features = []
    for block in self.body:
      x_BHWC = block(x_BHWC)
      features.append(x_BHWC)
    return features


class T2IAdapter(nnx.Module):
  """diffusers' T2IAdapter. `dtype` is the compute dtype, `param_dtype` that of the weights."""

  def __init__(
    self, config: T2IAdapterConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.config = config
    self.dtype = dtype
    kind = LightAdapter if config.adapter_type == "light_adapter" else FullAdapter
    self.adapter = kind(config, dtype=dtype, param_dtype=param_dtype, rngs=ParamKeys(rngs))

  def __call__(self, x, layout: str = "NHWC") -> tuple:
    """The feature maps, one per level (`config.levels`), in `layout`.

    `x` is the control image batch in [0, 1] at full pixel resolution (`preprocess_adapter_image`),
    [B, H, W, C] (or [B, C, H, W] with layout="NCHW"); H and W must divide by `downscale_factor`.
    """
    x_BHWC = to_nhwc(x, layout)
    cfg = self.config
    if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != cfg.in_channels:
      raise ValueError(
        f"T2IAdapter: expected a {layout} batch with {cfg.in_channels} channels, "
        f"got shape {tuple(x.shape)}"
      )
    H, W = x_BHWC.shape[1:3]
    r = cfg.downscale_factor
    if H % r or W % r:
      raise ValueError(
        f"T2IAdapter: image size {H}x{W} does not divide by the adapter's downscale_factor {r}"
      )
    features = self.adapter(pixel_unshuffle(x_BHWC.astype(self.dtype), r))
    return tuple(from_nhwc(f, layout) for f in features)


class UNetSlot(NamedTuple):
  """Where diffusers' UNet adds one adapter feature map, and the shape it needs there."""

  where: str
  channels: int
  downscale: int  # relative to the latents
  key: str  # the UNet config entry giving `channels`


def unet_slots(unet_config) -> tuple[tuple[UNetSlot, ...], UNetSlot]:
  """The down-path slots (one per down block, in order) and the mid-block slot of a UNet."""
  types, chans = unet_config.down_block_types, unet_config.block_out_channels
  n = len(chans)
  slots = []
  for i, (kind, c) in enumerate(zip(types, chans)):
    final = i == n - 1
    if kind == "CrossAttnDownBlock2D":
      where, scale = f"down block {i} ({kind}, before its downsampler)", 2**i
    else:
      where = f"down block {i} ({kind}, {'at its output' if final else 'after its downsampler'})"
      scale = 2**i if final else 2 ** (i + 1)
    slots.append(UNetSlot(where, c, scale, f"'block_out_channels'[{i}]"))
  mid = UNetSlot("the mid block", chans[-1], 2 ** (n - 1), f"'block_out_channels'[{n - 1}]")
  return tuple(slots), mid


def check_fits(
  adapter_config: T2IAdapterConfig,
  unet_config,
  source: str = "T2I-Adapter",
  *,
  vae_scale_factor: int = 8,
) -> None:
  """Raises a one-line ValueError when the adapter's feature maps cannot be added to the UNet.

  diffusers adds them in order, one per down block, then one to the mid block if its shape
  matches; a map of the wrong width fails there, and a map it cannot place is silently dropped,
  so here every map must have a slot and every down block must get one. `vae_scale_factor` is
  the image-to-latent downscale (8 for every released Stable Diffusion VAE).
  """
  levels = adapter_config.levels
  down, mid = unet_slots(unet_config)
  kind = f"'adapter_type'={adapter_config.adapter_type!r}"
  if len(levels) not in (len(down), len(down) + 1):
    raise ValueError(
      f"{source}: gives {len(levels)} feature maps ({kind}, 'channels'="
      f"{list(adapter_config.channels)}); the UNet takes {len(down)} (one per down block, "
      f"'block_out_channels'={list(unet_config.block_out_channels)}) or {len(down) + 1} with "
      "the mid block"
    )
  for i, (level, slot) in enumerate(zip(levels, down + (mid,))):
    if level.channels != slot.channels:
      raise ValueError(
        f"{source}: feature map {i} has 'channels'[{level.channel_index}]="
        f"{level.channels}, but {slot.where} of the UNet needs {slot.key}="
        f"{slot.channels}"
      )
    needed = vae_scale_factor * slot.downscale
    if level.downscale != needed:
      raise ValueError(
        f"{source}: feature map {i} comes at 1/{level.downscale} of the image "
        f"('downscale_factor'={adapter_config.downscale_factor}, {kind}), but "
        f"{slot.where} of the UNet needs 1/{needed} (vae_scale_factor "
        f"{vae_scale_factor})"
      )
