"""UNet2DConditionModel (SD1.x, SD2.x and SDXL topologies) with decoupled image cross-attention.

Built from a diffusers `unet/config.json`; module names follow diffusers so that weight conversion
is a mechanical table. Activations are NHWC inside.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.adapters import encode_image_prompt
from ipadapter_jax.models.attention import Attention, ImagePrompt, Transformer2DModel
from ipadapter_jax.models.config_checks import check_fixed, reject_unknown, require
from ipadapter_jax.models.embeddings import TimestepEmbedding, conditioning_embedding
from ipadapter_jax.models.image_proj import AdapterConfig, make_image_projection
from ipadapter_jax.models.layers import Conv2d, GroupNorm, ParamKeys, from_nhwc, to_nhwc
from ipadapter_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config keys this model does not implement, with the only value it accepts for each.
_FIXED_KEYS = {
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "only_cross_attention": False,
  "dropout": 0.0,
  "act_fn": "silu",
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "dual_cross_attention": False,
  "class_embed_type": None,
  "num_class_embeds": None,
  "resnet_time_scale_shift": "default",
  "resnet_skip_time_act": False,
  "time_embedding_type": "positional",
  "time_embedding_act_fn": None,
  "timestep_post_act": None,
  "time_cond_proj_dim": None,
  "attention_type": "default",
  "class_embeddings_concat": False,
  "mid_block_only_cross_attention": None,
  "cross_attention_norm": None,
}
# Per-block fields written as one number when every block has the same value.
_SCALAR_WHEN_UNIFORM = (
  "layers_per_block",
  "transformer_layers_per_block",
  "num_attention_heads",
  "cross_attention_dim",
)
# Keys read for information only (they do not change the computation).
_IGNORED_KEYS = ("addition_embed_type_num_heads",)


def _per_block(value, n: int, key: str, source: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{source}: '{key}' has {len(value)} entries for {n} down blocks")
    if any(isinstance(v, (list, tuple)) for v in value):
      raise ValueError(f"{source}: '{key}' with nested per-layer lists is not supported")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The settings of the UNet's encoder half (time embedding, down and mid blocks, added SDXL
  conditions), which a ControlNet shares with the UNet it steers; field names are diffusers'
  config keys. Per-block fields hold one entry per down block; `num_attention_heads` is the head
  count per block (diffusers' legacy `attention_head_dim` means the same thing)."""

  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
  in_channels: int = 4
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False  # attention logits are always float32 here
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None

  def __post_init__(self):
    n = len(self.block_out_channels)
    for key in ("down_block_types", "transformer_layers_per_block", "num_attention_heads"):
      if len(getattr(self, key)) != n:
        raise ValueError(f"'{key}' needs {n} entries, one per block, got {getattr(self, key)}")
    for t in self.down_block_types:
      if t not in DOWN_BLOCK_TYPES:
        raise ValueError(
          f"'down_block_types' entry {t!r} is not supported (supported: {DOWN_BLOCK_TYPES})"
        )
    if self.addition_embed_type not in (None, "text_time"):
      raise ValueError(
        f"'addition_embed_type'={self.addition_embed_type!r} is not supported (None or 'text_time')"
      )
    if self.addition_embed_type == "text_time" and not (
      self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
    ):
      raise ValueError(
        "'addition_embed_type'='text_time' needs "
        "'addition_time_embed_dim' and 'projection_class_embeddings_input_dim'"
      )

  @staticmethod
  def check_heads(channels: tuple[int, ...], heads: tuple[int, ...]) -> None:
    for c, h in zip(channels, heads):
      if c % h:
        raise ValueError(
          f"{c} channels do not split into {h} heads ('attention_head_dim' / 'num_attention_heads')"
        )

  @staticmethod
  def read_heads(raw: dict[str, Any]) -> None:
    """diffusers' naming in `raw`, made ours: `attention_head_dim` gives the number of heads when
    `num_attention_heads` is absent (SD1.5's "attention_head_dim": 8 means 8 heads), and SDXL
    writes a null `upcast_attention`."""
    heads = raw.pop("num_attention_heads", None)
    head_dim = raw.pop("attention_head_dim", 8)
    raw["num_attention_heads"] = heads if heads is not None else head_dim
    raw["upcast_attention"] = bool(raw.get("upcast_attention"))

  def diffusers_fields(self, scalar_when_uniform: tuple[str, ...]) -> dict[str, Any]:
    """The fields as diffusers writes them: lists, uniform per-block values as one number, the
    head count under the key every diffusers version reads (`attention_head_dim`)."""
    out = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in scalar_when_uniform and len(set(value)) == 1:
        value = value[0]  # as diffusers writes them (its IP-Adapter loader needs an int here)
      out[field.name] = list(value) if isinstance(value, tuple) else value
    out["attention_head_dim"] = out.pop("num_attention_heads")
    return out


@dataclasses.dataclass(frozen=True)
class UNetConfig(EncoderConfig):
  """The architecture of a UNet2DConditionModel: the encoder half's settings and the decoder's."""

  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  reverse_transformer_layers_per_block: tuple[int, ...] | None = None
  cross_attention_dim: tuple[int, ...] = (768, 768, 768, 768)
  out_channels: int = 4
  center_input_sample: bool = False
  resnet_out_scale_factor: float = 1.0
  time_embedding_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  sample_size: int | None = None  # latent size the model was trained at (informational)

  def __post_init__(self):
    super().__post_init__()
    n = len(self.block_out_channels)
    for key in ("up_block_types", "layers_per_block", "cross_attention_dim"):
      if len(getattr(self, key)) != n:
        raise ValueError(f"'{key}' needs {n} entries, one per block, got {getattr(self, key)}")
    for t in self.up_block_types:
      if t not in UP_BLOCK_TYPES:
        raise ValueError(
          f"'up_block_types' entry {t!r} is not supported (supported: {UP_BLOCK_TYPES})"
        )
    self.check_heads(self.block_out_channels, self.num_attention_heads)
    if (
      self.reverse_transformer_layers_per_block is not None
      and len(self.reverse_transformer_layers_per_block) != n
    ):
      raise ValueError(f"'reverse_transformer_layers_per_block' needs {n} entries")
    for key in ("conv_in_kernel", "conv_out_kernel"):
      if getattr(self, key) % 2 != 1:
        raise ValueError(f"'{key}' must be odd, got {getattr(self, key)}")

  @classmethod
  def from_diffusers(cls, raw: dict[str, Any], source: str = "unet config") -> "UNetConfig":
    """Parses a diffusers `unet/config.json` dict; unknown or unsupported settings raise."""
    raw = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _IGNORED_KEYS}
    check_fixed(raw, _FIXED_KEYS, source)
    require(raw, ("down_block_types", "block_out_channels"), source)
    n = len(raw["down_block_types"])
    cls.read_heads(raw)
    raw.setdefault("cross_attention_dim", 1280)
    raw.setdefault("layers_per_block", 2)
    raw.setdefault("transformer_layers_per_block", 1)
    for key in (
      "num_attention_heads",
      "cross_attention_dim",
      "layers_per_block",
      "transformer_layers_per_block",
    ):
      raw[key] = _per_block(raw[key], n, key, source)
    for key in (
      "block_out_channels",
      "down_block_types",
      "up_block_types",
      "reverse_transformer_layers_per_block",
    ):
      if raw.get(key) is not None:
        raw[key] = _per_block(raw[key], n, key, source)
    reject_unknown(raw, cls, source)
    try:
      return cls(**raw)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  def to_diffusers(self) -> dict[str, Any]:
    """A diffusers `config.json` dict describing this architecture."""
    return {
      "_class_name": "UNet2DConditionModel",
      **_FIXED_KEYS,
      **self.diffusers_fields(_SCALAR_WHEN_UNIFORM),
    }

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]


class DownBlock(nnx.Module):
  """diffusers' CrossAttnDownBlock2D (with `attentions`) or DownBlock2D (without)."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    *,
    num_layers: int,
    attention: dict | None,
    add_downsample: bool,
    downsample_padding: int,
    resnet: dict,
    rngs: nnx.Rngs,
  ):
    self.resnets = nnx.List(
      [
        ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, rngs=rngs, **resnet)
        for j in range(num_layers)
      ]
    )
    self.attentions = (
      None
      if attention is None
      else nnx.List(
        [Transformer2DModel(out_channels, rngs=rngs, **attention) for _ in range(num_layers)]
      )
    )
    self.downsamplers = (
      nnx.List(
        [
          Downsample2D(
            out_channels,
            padding=downsample_padding,
            dtype=resnet["dtype"],
            param_dtype=resnet["param_dtype"],
            rngs=rngs,
          )
        ]
      )
      if add_downsample
      else None
    )

  def __call__(self, x_BHWC, temb_BE, context_BSD, image_prompt, residual_BHWC=None):
    """`residual_BHWC` (a T2I-Adapter feature map) is added after the last layer, before the
    downsampler, so the skip carries it too."""
    skips = []
    for j, resnet in enumerate(self.resnets):
      x_BHWC = resnet(x_BHWC, temb_BE)
      if self.attentions is not None:
        x_BHWC = self.attentions[j](x_BHWC, context_BSD, image_prompt)
      if residual_BHWC is not None and j == len(self.resnets) - 1:
        x_BHWC = x_BHWC + residual_BHWC
      skips.append(x_BHWC)
    if self.downsamplers is not None:
      x_BHWC = self.downsamplers[0](x_BHWC)
      skips.append(x_BHWC)
    return x_BHWC, skips


class MidBlock(nnx.Module):
  """diffusers' UNetMidBlock2DCrossAttn: resnet, then (attention, resnet) pairs."""

  def __init__(self, channels: int, *, attention: dict, resnet: dict, rngs: nnx.Rngs):
    self.resnets = nnx.List(
      [ResnetBlock2D(channels, channels, rngs=rngs, **resnet) for _ in range(2)]
    )
    self.attentions = nnx.List([Transformer2DModel(channels, rngs=rngs, **attention)])

  def __call__(self, x_BHWC, temb_BE, context_BSD, image_prompt):
    x_BHWC = self.resnets[0](x_BHWC, temb_BE)
    for attention, resnet in zip(self.attentions, self.resnets[1:]):
      x_BHWC = resnet(attention(x_BHWC, context_BSD, image_prompt), temb_BE)
    return x_BHWC


class UpBlock(nnx.Module):
  """diffusers' CrossAttnUpBlock2D (with `attentions`) or UpBlock2D; each resnet eats one skip."""

  def __init__(
    self,
    in_channels: int,
    prev_channels: int,
    out_channels: int,
    *,
    num_layers: int,
    attention: dict | None,
    add_upsample: bool,
    resnet: dict,
    rngs: nnx.Rngs,
  ):
    def resnet_in(j):
      skip = in_channels if j == num_layers - 1 else out_channels
      return (prev_channels if j == 0 else out_channels) + skip

    self.resnets = nnx.List(
      [ResnetBlock2D(resnet_in(j), out_channels, rngs=rngs, **resnet) for j in range(num_layers)]
    )
    self.attentions = (
      None
      if attention is None
      else nnx.List(
        [Transformer2DModel(out_channels, rngs=rngs, **attention) for _ in range(num_layers)]
      )
    )
    self.upsamplers = (
      nnx.List(
        [
          Upsample2D(
            out_channels, dtype=resnet["dtype"], param_dtype=resnet["param_dtype"], rngs=rngs
          )
        ]
      )
      if add_upsample
      else None
    )

  def __call__(self, x_BHWC, skips, temb_BE, context_BSD, image_prompt, upsample_size=None):
    for j, resnet in enumerate(self.resnets):
      x_BHWC = resnet(jnp.concatenate([x_BHWC, skips[-1 - j]], axis=-1), temb_BE)
      if self.attentions is not None:
        x_BHWC = self.attentions[j](x_BHWC, context_BSD, image_prompt)
    if self.upsamplers is not None:
      x_BHWC = self.upsamplers[0](x_BHWC, upsample_size)
    return x_BHWC


class UNet2DConditionModel(nnx.Module):
  """The Stable Diffusion noise predictor; with `adapter` it also owns the IP-Adapter weights.

  The adapter (image projection plus to_k_ip/to_v_ip in every cross-attention layer) is stored as
  `AdapterParam`, the rest as `nnx.Param`. `dtype` is the compute dtype, `param_dtype` that of the
  base weights; adapter weights are always float32.
  """

  def __init__(
    self,
    config: UNetConfig,
    *,
    adapter: AdapterConfig | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention_implementation: str | None = None,
    rngs: nnx.Rngs,
  ):
    cfg = config
    rngs = ParamKeys(rngs)
    self.config = cfg
    self.adapter_config = adapter
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    c0, n = cfg.block_out_channels[0], len(cfg.block_out_channels)
    image_context_dim = None
    if adapter is not None:
      if len(set(cfg.cross_attention_dim)) != 1:
        raise ValueError(
          "an IP-Adapter needs one cross_attention_dim for every block, "
          f"got {cfg.cross_attention_dim}"
        )
      image_context_dim = cfg.cross_attention_dim[0]
    resnet = dict(
      temb_channels=cfg.time_embed_dim,
      groups=cfg.norm_num_groups,
      eps=cfg.norm_eps,
      output_scale_factor=cfg.resnet_out_scale_factor,
      **kw,
    )

    def attention(block: int, channels: int, layers: int) -> dict:
      heads = cfg.num_attention_heads[block]
      return dict(
        heads=heads,
        head_dim=channels // heads,
        context_dim=cfg.cross_attention_dim[block],
        num_layers=layers,
        norm_groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        image_context_dim=image_context_dim,
        implementation=attention_implementation,
        **kw,
      )

    self.conv_in = Conv2d(
      cfg.in_channels, c0, cfg.conv_in_kernel, padding=cfg.conv_in_kernel // 2, rngs=rngs, **kw
    )
    self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, rngs=rngs, **kw)
    self.add_embedding = (
      TimestepEmbedding(
        cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim, rngs=rngs, **kw
      )
      if cfg.addition_embed_type == "text_time"
      else None
    )

    down_blocks, out_ch = [], c0
    for i, block_type in enumerate(cfg.down_block_types):
      in_ch, out_ch = out_ch, cfg.block_out_channels[i]
      attn = (
        attention(i, out_ch, cfg.transformer_layers_per_block[i])
        if block_type == "CrossAttnDownBlock2D"
        else None
      )
      down_blocks.append(
        DownBlock(
          in_ch,
          out_ch,
          num_layers=cfg.layers_per_block[i],
          attention=attn,
          add_downsample=i < n - 1,
          downsample_padding=cfg.downsample_padding,
          resnet=resnet,
          rngs=rngs,
        )
      )
    self.down_blocks = nnx.List(down_blocks)

    mid_resnet = dict(resnet, output_scale_factor=cfg.mid_block_scale_factor)
    self.mid_block = MidBlock(
      cfg.block_out_channels[-1],
      attention=attention(n - 1, cfg.block_out_channels[-1], cfg.transformer_layers_per_block[-1]),
      resnet=mid_resnet,
      rngs=rngs,
    )

    rev_channels = cfg.block_out_channels[::-1]
    rev_transformer_layers = (
      cfg.reverse_transformer_layers_per_block or cfg.transformer_layers_per_block[::-1]
    )
    up_blocks, out_ch = [], rev_channels[0]
    for i, block_type in enumerate(cfg.up_block_types):
      prev_ch, out_ch = out_ch, rev_channels[i]
      in_ch = rev_channels[min(i + 1, n - 1)]
      block = n - 1 - i  # the down block at the same resolution (for per-block settings)
      attn = (
        attention(block, out_ch, rev_transformer_layers[i])
        if block_type == "CrossAttnUpBlock2D"
        else None
      )
      up_blocks.append(
        UpBlock(
          in_ch,
          prev_ch,
          out_ch,
          num_layers=cfg.layers_per_block[block] + 1,
          attention=attn,
          add_upsample=i < n - 1,
          resnet=resnet,
          rngs=rngs,
        )
      )
    self.up_blocks = nnx.List(up_blocks)

    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, c0, eps=cfg.norm_eps, **kw)
    self.conv_out = Conv2d(
      c0, cfg.out_channels, cfg.conv_out_kernel, padding=cfg.conv_out_kernel // 2, rngs=rngs, **kw
    )

    self.image_proj = (
      make_image_projection(adapter, image_context_dim, dtype=dtype, rngs=rngs)
      if adapter is not None
      else None
    )
    for index, layer in enumerate(self.decoupled_layers()):
      layer.ip_index = index
      layer.joint_softmax = adapter.attention == "simple"
    self.dtype = dtype
    self.remat = "none"  # none | full | dots: rematerialise each block in the backward pass

  def _run(self, block, *args, **static):
    """Calls a block, rematerialised in the backward pass when `self.remat` asks for it."""
    if self.remat == "none":
      return block(*args, **static)
    policy = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}[self.remat]
    # The block as a pure function of its weights: nothing is written back, so frozen weights
    # may belong to an outer trace (the train step differentiates the adapter alone).
    graphdef, weights = nnx.split(block)

    def pure(weights, *traced):
      return nnx.merge(graphdef, weights)(*traced, **static)

    return jax.checkpoint(pure, policy=policy)(weights, *args)

  def reset_adapter(self, rngs: nnx.Rngs):
    """The training initialisation: a fresh projection; to_k_ip/to_v_ip copy each to_k/to_v."""
    if self.image_proj is None:
      raise ValueError("this UNet was built without an adapter")
    fresh = make_image_projection(
      self.adapter_config, self.config.cross_attention_dim[0], dtype=self.dtype, rngs=rngs
    )
    nnx.update(self.image_proj, nnx.state(fresh))
    for layer in self.decoupled_layers():
      layer.to_k_ip.kernel.set_value(jnp.asarray(layer.to_k.kernel[...], jnp.float32))
      layer.to_v_ip.kernel.set_value(jnp.asarray(layer.to_v.kernel[...], jnp.float32))

  def cross_attention_layers(self) -> list[Attention]:
    """Every attn2, in the official checkpoint's order: down blocks, then up blocks, then mid."""
    blocks = [*self.down_blocks, *self.up_blocks, self.mid_block]
    return [
      transformer.attn2
      for block in blocks
      if block.attentions is not None
      for attention in block.attentions
      for transformer in attention.transformer_blocks
    ]

  def decoupled_layers(self) -> list[Attention]:
    """The cross-attention layers that carry to_k_ip/to_v_ip (all of them, with an adapter)."""
    return [layer for layer in self.cross_attention_layers() if layer.to_k_ip is not None]

  def cross_attention_names(self) -> list[str]:
    """diffusers' module path ("down_blocks.1.attentions.0", ..., "mid_block.attentions.0") of
    the attention holding each cross-attention layer, in checkpoint order (what block
    dictionaries of adapter scales address)."""
    names = []
    for kind, blocks in (
      ("down_blocks", self.down_blocks),
      ("up_blocks", self.up_blocks),
      ("mid_block", [self.mid_block]),
    ):
      for i, block in enumerate(blocks):
        prefix = kind if kind == "mid_block" else f"{kind}.{i}"
        for j, attention in enumerate(block.attentions if block.attentions is not None else ()):
          names += [f"{prefix}.attentions.{j}"] * len(attention.transformer_blocks)
    return names

  def cross_attention_queries(self, height: int, width: int) -> list[int]:
    """The number of queries (positions) of each cross-attention layer, in checkpoint order,
    for latents of height x width (each downsampler halves a side, rounding up)."""
    sizes = [(height, width)]
    for _ in range(len(self.down_blocks) - 1):
      h, w = sizes[-1]
      sizes.append(((h + 1) // 2, (w + 1) // 2))
    counts = []
    for level, block in enumerate(self.down_blocks):
      counts += [sizes[level][0] * sizes[level][1]] * self._layers_in(block)
    for j, block in enumerate(self.up_blocks):
      level = len(sizes) - 1 - j
      counts += [sizes[level][0] * sizes[level][1]] * self._layers_in(block)
    return counts + [sizes[-1][0] * sizes[-1][1]] * self._layers_in(self.mid_block)

  @staticmethod
  def _layers_in(block) -> int:
    if block.attentions is None:
      return 0
    return sum(len(attention.transformer_blocks) for attention in block.attentions)

  def encode_image_prompt(self, image_features, scale=1.0, **kw) -> ImagePrompt:
    """Image features -> image tokens -> every layer's keys/values; once per generation.

    `image_features` are CLIP `image_embeds` [B, E] for the basic adapter, the vision tower's
    `hidden_states[-2]` [B, T, E] for plus and full_face. `scale` is a scalar or one value per
    decoupled layer (checkpoint order). `num_images`, `weights` and `masks`: see
    `ipadapter_jax.models.adapters.encode_image_prompt`.
    """
    if self.image_proj is None:
      raise ValueError("this UNet was built without an adapter: no image prompt can be used")
    return encode_image_prompt(
      self.image_proj, self.decoupled_layers(), image_features, scale, dtype=self.dtype, **kw
    )

  def __call__(
    self,
    sample,
    timesteps,
    encoder_hidden_states,
    *,
    image_embeds=None,
    ip_scale=1.0,
    image_prompt: ImagePrompt | None = None,
    text_embeds=None,
    time_ids=None,
    down_residuals=None,
    mid_residual=None,
    intrablock_residuals=None,
    layout: str = "NHWC",
  ):
    """Predicts the noise (or v) for `sample` at `timesteps`.

    Args:
      sample: latents [B, H, W, C], or [B, C, H, W] (diffusers' layout) with layout="NCHW";
        the output has the same layout.
      timesteps: a scalar or [B], integer or fractional.
      encoder_hidden_states: text tokens [B, S, D].
      image_embeds: the adapter's image features (CLIP image_embeds [B, E], or hidden_states[-2]
        [B, T, E] for plus/full_face), or None for the base model. Their tokens play the role
        of the image tokens the official implementation appends after the text tokens.
      ip_scale: adapter scale, a scalar or one value per cross-attention layer in checkpoint
        order; traced, so changing it never recompiles.
      image_prompt: precomputed `encode_image_prompt(...)` output (or a tuple of them, one per
        adapter), instead of image_embeds.
      text_embeds, time_ids: SDXL's pooled text embedding [B, P] and size/crop ids [B, 6].
      down_residuals, mid_residual: a ControlNet's outputs (NHWC), added to every skip
        connection and to the mid block's output.
      intrablock_residuals: a T2I-Adapter's feature maps (NHWC), in order: added inside each
        cross-attention down block (before its downsampler), after each other down block (to
        its last skip as well), and the one left over, when its shape fits, after the mid
        block (diffusers' placement).
    """
    if image_embeds is not None:
      if image_prompt is not None:
        raise ValueError("pass either image_embeds or image_prompt, not both")
      image_prompt = self.encode_image_prompt(image_embeds, ip_scale)
    cfg = self.config
    x_BHWC = to_nhwc(sample, layout)
    B = x_BHWC.shape[0]
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
      owner="UNet",
    )

    if cfg.center_input_sample:
      x_BHWC = 2 * x_BHWC - 1.0
    x_BHWC = self.conv_in(x_BHWC.astype(self.dtype))
    skips = [x_BHWC]
    intrablock = list(intrablock_residuals or ())
    for block in self.down_blocks:
      inside = intrablock.pop(0) if block.attentions is not None and intrablock else None
      x_BHWC, block_skips = self._run(block, x_BHWC, temb_BE, context_BSD, image_prompt, inside)
      if block.attentions is None and intrablock:
        # After the block (and its downsampler); diffusers adds in place, so the block's last
        # skip carries it too.
        x_BHWC = x_BHWC + intrablock.pop(0)
        block_skips = block_skips[:-1] + [x_BHWC]
      skips += block_skips
    if down_residuals is not None:
      if len(down_residuals) != len(skips):
        raise ValueError(f"{len(down_residuals)} down residuals for {len(skips)} skip connections")
      skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
    x_BHWC = self._run(self.mid_block, x_BHWC, temb_BE, context_BSD, image_prompt)
    if intrablock and intrablock[0].shape == x_BHWC.shape:
      x_BHWC = x_BHWC + intrablock.pop(0)
    if mid_residual is not None:
      x_BHWC = x_BHWC + mid_residual.astype(x_BHWC.dtype)
    for block in self.up_blocks:
      used = len(block.resnets)
      block_skips, skips = skips[-used:], skips[:-used]
      size = skips[-1].shape[1:3] if skips else None  # the next resolution up, even for odd sizes
      x_BHWC = self._run(
        block, x_BHWC, block_skips, temb_BE, context_BSD, image_prompt, upsample_size=size
      )
    out = self.conv_out(jax.nn.silu(self.conv_norm_out(x_BHWC)))
    return from_nhwc(out, layout)
