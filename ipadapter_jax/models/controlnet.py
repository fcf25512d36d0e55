"""ControlNetModel (SD1.x, SD2.x and SDXL topologies): the UNet's encoder half, steered by an image.

Built from a diffusers controlnet `config.json`; module names follow diffusers so that weight
conversion is the UNet's mechanical table. It reuses the UNet's down and mid blocks and returns
one residual per UNet skip connection plus one for the mid block, to be added to the UNet's.
Activations are NHWC inside. The ControlNet never sees image-prompt tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.models.config_checks import check_fixed, reject_unknown, require
from ipadapter_jax.models.embeddings import TimestepEmbedding, conditioning_embedding
from ipadapter_jax.models.layers import Conv2d, ParamKeys, from_nhwc, to_nhwc
from ipadapter_jax.models.resnet import ResnetBlock2D
from ipadapter_jax.models.unet import DownBlock, EncoderConfig, MidBlock, UNetConfig, _per_block

MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
CHANNEL_ORDERS = ("rgb", "bgr")

# diffusers config keys this model does not implement, with the only value it accepts for each.
_FIXED_KEYS = {
  "only_cross_attention": False,
  "act_fn": "silu",
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "class_embed_type": None,
  "num_class_embeds": None,
  "resnet_time_scale_shift": "default",
}
# Keys read for information only (they do not change the computation).
_IGNORED_KEYS = ("addition_embed_type_num_heads",)
# Per-block fields written as one number when every block has the same value.
_SCALAR_WHEN_UNIFORM = ("transformer_layers_per_block", "num_attention_heads")


def _one_number(raw: dict, key: str, source: str) -> None:
  """diffusers' ControlNetModel takes these as one number for every block."""
  value = raw.get(key)
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(
        f"{source}: '{key}'={list(value)!r} is not supported "
        "(a ControlNet takes one number for every block)"
      )
    raw[key] = value[0]


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(EncoderConfig):
  """The architecture of a diffusers ControlNetModel: the UNet encoder half's settings, with
  `layers_per_block` and `cross_attention_dim` one number as diffusers has them, plus the
  conditioning image's embedding and the mid block's type."""

  layers_per_block: int = 2
  cross_attention_dim: int = 1280
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
  controlnet_conditioning_channel_order: str = "rgb"
  global_pool_conditions: bool = False

  def __post_init__(self):
    super().__post_init__()
    n = len(self.block_out_channels)
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(
        f"'mid_block_type'={self.mid_block_type!r} is not supported (supported: {MID_BLOCK_TYPES})"
      )
    for key in (
      "layers_per_block",
      "cross_attention_dim",
      "norm_num_groups",
      "conditioning_channels",
    ):
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"'{key}' must be a positive number, got {value!r}")
    attended = [i for i, t in enumerate(self.down_block_types) if t == "CrossAttnDownBlock2D"]
    if self.mid_block_type == "UNetMidBlock2DCrossAttn":
      attended.append(n - 1)
    self.check_heads(
      tuple(self.block_out_channels[i] for i in attended),
      tuple(self.num_attention_heads[i] for i in attended),
    )
    if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
      raise ValueError(
        "'controlnet_conditioning_channel_order'="
        f"{self.controlnet_conditioning_channel_order!r} is not supported "
        f"(supported: {CHANNEL_ORDERS})"
      )
    if not self.conditioning_embedding_out_channels:
      raise ValueError("'conditioning_embedding_out_channels' needs at least one entry")

  @classmethod
  def from_diffusers(
    cls, raw: dict[str, Any], source: str = "controlnet config"
  ) -> "ControlNetConfig":
    """Parses a diffusers controlnet `config.json` dict; unknown or unsupported settings raise."""
    raw = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _IGNORED_KEYS}
    check_fixed(raw, _FIXED_KEYS, source)
    require(raw, ("down_block_types", "block_out_channels"), source)
    n = len(raw["down_block_types"])
    cls.read_heads(raw)
    raw.setdefault("transformer_layers_per_block", 1)
    for key in ("layers_per_block", "cross_attention_dim"):
      _one_number(raw, key, source)
    for key in (
      "num_attention_heads",
      "transformer_layers_per_block",
      "block_out_channels",
      "down_block_types",
    ):
      raw[key] = _per_block(raw[key], n, key, source)
    if raw.get("conditioning_embedding_out_channels") is not None:
      raw["conditioning_embedding_out_channels"] = tuple(raw["conditioning_embedding_out_channels"])
    else:
      raw.pop("conditioning_embedding_out_channels", None)
    reject_unknown(raw, cls, source)
    try:
      return cls(**raw)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from None

  @classmethod
  def from_unet(cls, unet: UNetConfig, **overrides) -> "ControlNetConfig":
    """The ControlNet that fits `unet` (diffusers' `ControlNetModel.from_unet`); `overrides` set
    the ControlNet's own fields (conditioning_embedding_out_channels, channel order, ...)."""
    for key in ("layers_per_block", "cross_attention_dim"):
      if len(set(getattr(unet, key))) != 1:
        raise ValueError(
          f"a ControlNet takes one '{key}' for every block, the UNet has {getattr(unet, key)}"
        )
    shared = {f.name: getattr(unet, f.name) for f in dataclasses.fields(EncoderConfig)}
    shared.update(
      layers_per_block=unet.layers_per_block[0], cross_attention_dim=unet.cross_attention_dim[0]
    )
    return cls(**{**shared, **overrides})

  def to_diffusers(self) -> dict[str, Any]:
    """A diffusers `config.json` dict describing this architecture."""
    return {
      "_class_name": "ControlNetModel",
      **_FIXED_KEYS,
      **self.diffusers_fields(_SCALAR_WHEN_UNIFORM),
    }

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @property
  def conditioning_downscale(self) -> int:
    """How many conditioning-image pixels make one latent pixel along each side."""
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  @property
  def num_down_residuals(self) -> int:
    n = len(self.block_out_channels)
    return 1 + n * self.layers_per_block + (n - 1)


def check_fits(controlnet: ControlNetConfig, unet: UNetConfig, source: str = "controlnet") -> None:
  """Raises a one-line ValueError when the ControlNet's residuals or its conditioning inputs
  do not match those of `unet`, naming the first mismatching key and both values."""
  n = len(controlnet.block_out_channels)
  per_block = lambda value: (value,) * n
  pairs = [
    ("block_out_channels", controlnet.block_out_channels, unet.block_out_channels),
    ("in_channels", controlnet.in_channels, unet.in_channels),
    ("layers_per_block", per_block(controlnet.layers_per_block), unet.layers_per_block),
    ("downsample_padding", controlnet.downsample_padding, unet.downsample_padding),
    ("cross_attention_dim", per_block(controlnet.cross_attention_dim), unet.cross_attention_dim),
    ("addition_embed_type", controlnet.addition_embed_type, unet.addition_embed_type),
  ]
  if controlnet.addition_embed_type is not None:
    pairs += [
      (key, getattr(controlnet, key), getattr(unet, key))
      for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
    ]
  for key, mine, theirs in pairs:
    if mine != theirs:
      raise ValueError(
        f"{source}: '{key}' is {mine!r} in the ControlNet but {theirs!r} in the "
        "UNet, so it cannot condition that UNet"
      )


def _zeroed(conv: Conv2d) -> Conv2d:
  """diffusers' zero_module: a new ControlNet starts as a no-op on the UNet."""
  conv.kernel.set_value(jnp.zeros_like(conv.kernel.get_value()))
  conv.bias.set_value(jnp.zeros_like(conv.bias.get_value()))
  return conv


class ControlNetConditioningEmbedding(nnx.Module):
  """conv_in, then (3x3 conv, 3x3 stride-2 conv) per channel step, SiLU after each, then conv_out:
  the conditioning image brought down to the latent resolution and the UNet's first width."""

  def __init__(
    self,
    conditioning_channels: int,
    out_channels: int,
    channels: tuple[int, ...],
    *,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv_in = Conv2d(conditioning_channels, channels[0], 3, padding=1, **kw)
    blocks = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
      blocks.append(Conv2d(c_in, c_in, 3, padding=1, **kw))
      blocks.append(Conv2d(c_in, c_out, 3, stride=2, padding=1, **kw))
    self.blocks = nnx.List(blocks)
    self.conv_out = _zeroed(Conv2d(channels[-1], out_channels, 3, padding=1, **kw))

  def __call__(self, cond_BHWC):
    h = jax.nn.silu(self.conv_in(cond_BHWC))
    for conv in self.blocks:
      h = jax.nn.silu(conv(h))
    return self.conv_out(h)


class ResnetMidBlock(nnx.Module):
  """diffusers' UNetMidBlock2D as ControlNets build it (no attention, no extra layers): one
  resnet."""

  def __init__(self, channels: int, *, resnet: dict, rngs):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, rngs=rngs, **resnet)])
    self.attentions = None

  def __call__(self, x_BHWC, temb_BE, context_BSD, image_prompt):
    del context_BSD, image_prompt
    return self.resnets[0](x_BHWC, temb_BE)


class ControlNetModel(nnx.Module):
  """A ControlNet: residuals for every UNet skip connection and the mid block, from the noisy
  latents, the text and a conditioning image. `dtype` is the compute dtype, `param_dtype` that
  of the weights."""

  def __init__(
    self,
    config: ControlNetConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention_implementation: str | None = None,
    rngs: nnx.Rngs,
  ):
    cfg = config
    rngs = ParamKeys(rngs)
    self.config = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    c0, n = cfg.block_out_channels[0], len(cfg.block_out_channels)
    resnet = dict(
      temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw
    )

    def attention(block: int, channels: int) -> dict:
      heads = cfg.num_attention_heads[block]
      return dict(
        heads=heads,
        head_dim=channels // heads,
        context_dim=cfg.cross_attention_dim,
        num_layers=cfg.transformer_layers_per_block[block],
        norm_groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        image_context_dim=None,
        implementation=attention_implementation,
        **kw,
      )

    def head(channels: int) -> Conv2d:
      return _zeroed(Conv2d(channels, channels, 1, rngs=rngs, **kw))

    self.conv_in = Conv2d(cfg.in_channels, c0, 3, padding=1, rngs=rngs, **kw)
    self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, rngs=rngs, **kw)
    self.add_embedding = (
      TimestepEmbedding(
        cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim, rngs=rngs, **kw
      )
      if cfg.addition_embed_type == "text_time"
      else None
    )
    self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
      cfg.conditioning_channels, c0, cfg.conditioning_embedding_out_channels, rngs=rngs, **kw
    )

    down_blocks, heads, out_ch = [], [head(c0)], c0
    for i, block_type in enumerate(cfg.down_block_types):
      in_ch, out_ch = out_ch, cfg.block_out_channels[i]
      attn = attention(i, out_ch) if block_type == "CrossAttnDownBlock2D" else None
      down_blocks.append(
        DownBlock(
          in_ch,
          out_ch,
          num_layers=cfg.layers_per_block,
          attention=attn,
          add_downsample=i < n - 1,
          downsample_padding=cfg.downsample_padding,
          resnet=resnet,
          rngs=rngs,
        )
      )
      heads += [head(out_ch) for _ in range(cfg.layers_per_block + (i < n - 1))]
    self.down_blocks = nnx.List(down_blocks)
    self.controlnet_down_blocks = nnx.List(heads)

    c_mid = cfg.block_out_channels[-1]
    mid_resnet = dict(resnet, output_scale_factor=cfg.mid_block_scale_factor)
    if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
      self.mid_block = MidBlock(
        c_mid, attention=attention(n - 1, c_mid), resnet=mid_resnet, rngs=rngs
      )
    else:
      self.mid_block = ResnetMidBlock(c_mid, resnet=mid_resnet, rngs=rngs)
    self.controlnet_mid_block = head(c_mid)
    self.dtype = dtype

  def __call__(
    self,
    sample,
    timesteps,
    encoder_hidden_states,
    controlnet_cond,
    *,
    conditioning_scale=1.0,
    text_embeds=None,
    time_ids=None,
    guess_mode: bool = False,
    layout: str = "NHWC",
  ):
    """The residuals to add to the UNet's skip connections and to its mid block output.

    Args:
      sample: latents [B, h, w, C], or [B, C, h, w] with layout="NCHW" (then the outputs too).
      timesteps: a scalar or [B], integer or fractional.
      encoder_hidden_states: text tokens [B, S, D] (never image-prompt tokens).
      controlnet_cond: the conditioning image at pixel resolution, [B, H, W, 3] in [0, 1] (in
        `layout`), H = h * `config.conditioning_downscale`.
      conditioning_scale: multiplies every residual; traced, so changing it never recompiles.
      text_embeds, time_ids: SDXL's pooled text embedding [B, P] and size/crop ids [B, 6].
      guess_mode: a Python bool; diffusers' guess mode, residual i of n+1 (mid last) scaled by
        10 ** (i / n - 1) on top of conditioning_scale.

    Returns:
      (down residuals, one per UNet skip in the UNet's order, each [B, h_i, w_i, C_i];
      mid residual [B, h_n, w_n, C_n]), in `layout`. With `global_pool_conditions` each is
      averaged over its spatial positions ([B, 1, 1, C]).
    """
    cfg = self.config
    x_BHWC = to_nhwc(sample, layout)
    cond_BHWC = to_nhwc(controlnet_cond, layout)
    B = x_BHWC.shape[0]
    if cond_BHWC.shape[-1] != cfg.conditioning_channels:
      raise ValueError(
        f"controlnet_cond has {cond_BHWC.shape[-1]} channels, this ControlNet "
        f"takes {cfg.conditioning_channels} (layout={layout!r})"
      )
    if cfg.controlnet_conditioning_channel_order == "bgr":
      cond_BHWC = cond_BHWC[..., ::-1]
    context_BSD = encoder_hidden_states.astype(self.dtype)

    temb_BE = conditioning_embedding(
      cfg,
      self.time_embedding,
      self.add_embedding,
      timesteps,
      B,
      self.dtype,
      text_embeds=text_embeds,
      time_ids=time_ids,
      owner="ControlNet",
    )

    x_BHWC = self.conv_in(x_BHWC.astype(self.dtype))
    hint_BHWC = self.controlnet_cond_embedding(cond_BHWC.astype(self.dtype))
    if hint_BHWC.shape[1:3] != x_BHWC.shape[1:3]:
      raise ValueError(
        f"controlnet_cond of {cond_BHWC.shape[1]}x{cond_BHWC.shape[2]} pixels "
        f"embeds to {hint_BHWC.shape[1]}x{hint_BHWC.shape[2]}, but the latents are "
        f"{x_BHWC.shape[1]}x{x_BHWC.shape[2]}: the image must be "
        f"{cfg.conditioning_downscale}x the latent size"
      )
    x_BHWC = x_BHWC + hint_BHWC
    skips = [x_BHWC]
    for block in self.down_blocks:
      x_BHWC, block_skips = block(x_BHWC, temb_BE, context_BSD, None)
      skips += block_skips
    x_BHWC = self.mid_block(x_BHWC, temb_BE, context_BSD, None)

    down = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]
    mid = self.controlnet_mid_block(x_BHWC)
    scale = jnp.asarray(conditioning_scale, jnp.float32)
    if guess_mode and not cfg.global_pool_conditions:
      # as diffusers: logspace(-1, 0, n + 1) in float32, times the conditioning scale
      steps = jnp.asarray(np.logspace(-1.0, 0.0, len(down) + 1), jnp.float32) * scale
    else:
      steps = jnp.broadcast_to(scale, (len(down) + 1,))
    steps = steps.astype(self.dtype)
    down = [r * steps[i] for i, r in enumerate(down)]
    mid = mid * steps[-1]
    if cfg.global_pool_conditions:
      down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
      mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return tuple(from_nhwc(r, layout) for r in down), from_nhwc(mid, layout)
