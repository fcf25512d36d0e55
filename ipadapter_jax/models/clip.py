"""CLIP text and vision transformers (transformers' CLIPTextModel[WithProjection] and
CLIPVisionModelWithProjection), with transformers' module names.

Shape letters as in `ipadapter_jax.models` (docs/conventions.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.attention import dot_product_attention
from ipadapter_jax.models.config_checks import require
from ipadapter_jax.models.layers import Conv2d, Embed, LayerNorm, Linear, ParamKeys, to_nhwc

ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def _check_activation(raw, source):
  act = raw.get("hidden_act", "quick_gelu")
  if act not in ACTIVATIONS:
    raise ValueError(f"{source}: 'hidden_act'={act!r} is not supported ({sorted(ACTIVATIONS)})")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """A CLIP text tower; field names are transformers' config keys."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 0
  eos_token_id: int = 2
  pad_token_id: int = 1
  projection_dim: int | None = None  # set for CLIPTextModelWithProjection

  @classmethod
  def from_transformers(
    cls, raw: dict[str, Any], *, with_projection: bool, source: str = "text encoder config"
  ) -> "CLIPTextConfig":
    """Reads a transformers CLIPTextConfig (or the text part of a full CLIPConfig)."""
    if "text_config" in raw:  # CLIPModel projects with its top-level projection_dim
      raw = {**raw["text_config"], "projection_dim": raw.get("projection_dim", 512)}
    require(
      raw,
      (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
      ),
      source,
    )
    if with_projection:
      require(raw, ("projection_dim",), source)
    _check_activation(raw, source)
    values = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
    values["projection_dim"] = raw["projection_dim"] if with_projection else None
    return cls(**values)

  def to_transformers(self) -> dict[str, Any]:
    """A transformers config.json dict for this tower."""
    out = dataclasses.asdict(self)
    with_projection = out["projection_dim"] is not None
    if not with_projection:
      del out["projection_dim"]
    arch = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    return {"architectures": [arch], "model_type": "clip_text_model", **out}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """A CLIP vision tower with its projection; field names are transformers' config keys."""

  hidden_size: int = 1280
  intermediate_size: int = 5120
  num_hidden_layers: int = 32
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 1024

  @classmethod
  def from_transformers(
    cls, raw: dict[str, Any], source: str = "image encoder config"
  ) -> "CLIPVisionConfig":
    """Reads a transformers CLIPVisionConfig (or the vision part of a full CLIPConfig)."""
    if "vision_config" in raw:
      raw = {**raw["vision_config"], "projection_dim": raw.get("projection_dim", 512)}
    require(
      raw,
      (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "projection_dim",
      ),
      source,
    )
    _check_activation(raw, source)
    return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})

  def to_transformers(self) -> dict[str, Any]:
    """A transformers config.json dict for this tower."""
    return {
      "architectures": ["CLIPVisionModelWithProjection"],
      "model_type": "clip_vision_model",
      **dataclasses.asdict(self),
    }

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with biased q/k/v/out projections."""

  def __init__(self, dim: int, heads: int, *, causal: bool, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj, self.k_proj = Linear(dim, dim, **kw), Linear(dim, dim, **kw)
    self.v_proj, self.out_proj = Linear(dim, dim, **kw), Linear(dim, dim, **kw)
    self.heads, self.causal = heads, causal

  def __call__(self, x_BTD):
    split = lambda y: y.reshape(y.shape[:-1] + (self.heads, -1))
    out = dot_product_attention(
      split(self.q_proj(x_BTD)),
      split(self.k_proj(x_BTD)),
      split(self.v_proj(x_BTD)),
      is_causal=self.causal,
    )
    return self.out_proj(out.reshape(x_BTD.shape))


class CLIPMLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, act: str, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1, self.fc2 = Linear(dim, hidden, **kw), Linear(hidden, dim, **kw)
    self.act = act

  def __call__(self, x):
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-LN transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

  def __init__(self, cfg, *, causal: bool, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    D = cfg.hidden_size
    self.self_attn = CLIPAttention(D, cfg.num_attention_heads, causal=causal, rngs=rngs, **kw)
    self.layer_norm1 = LayerNorm(D, eps=cfg.layer_norm_eps, **kw)
    self.mlp = CLIPMLP(D, cfg.intermediate_size, cfg.hidden_act, rngs=rngs, **kw)
    self.layer_norm2 = LayerNorm(D, eps=cfg.layer_norm_eps, **kw)

  def __call__(self, x_BTD):
    x_BTD = x_BTD + self.self_attn(self.layer_norm1(x_BTD))
    return x_BTD + self.mlp(self.layer_norm2(x_BTD))


class CLIPEncoder(nnx.Module):
  def __init__(self, cfg, *, causal: bool, dtype, param_dtype, rngs):
    self.layers = nnx.List(
      [
        CLIPEncoderLayer(cfg, causal=causal, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(cfg.num_hidden_layers)
      ]
    )

  def __call__(self, x_BTD):
    """All hidden states: the input, then each layer's output (transformers' `hidden_states`)."""
    states = [x_BTD]
    for layer in self.layers:
      states.append(layer(states[-1]))
    return tuple(states)


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.position_embedding = Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)

  def __call__(self, ids_BT):
    return self.token_embedding(ids_BT) + self.position_embedding(jnp.arange(ids_BT.shape[1]))


class CLIPTextTransformer(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = CLIPTextEmbeddings(cfg, **kw)
    self.encoder = CLIPEncoder(cfg, causal=True, **kw)
    self.final_layer_norm = LayerNorm(
      cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
    )


class TextOutput(NamedTuple):
  last_hidden_state: jax.Array  # [B, T, D], after the final LayerNorm
  pooled: jax.Array  # [B, D], the end-of-text token of last_hidden_state
  hidden_states: tuple  # input embeddings and every layer's output (no final LN)
  text_embeds: jax.Array | None  # [B, P], text_projection(pooled) when the model has one


class CLIPTextModel(nnx.Module):
  """CLIP text encoder (SD1/SD2, SDXL's first encoder) or, with `projection_dim`,
  CLIPTextModelWithProjection (SDXL's second encoder)."""

  def __init__(
    self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    rngs = ParamKeys(rngs)
    self.config = config
    self.text_model = CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text_projection = (
      Linear(
        config.hidden_size,
        config.projection_dim,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
      if config.projection_dim
      else None
    )

  def __call__(self, input_ids_BT) -> TextOutput:
    tm = self.text_model
    states = tm.encoder(tm.embeddings(input_ids_BT))
    last_BTD = tm.final_layer_norm(states[-1])
    eos = self.config.eos_token_id
    # Configs written before transformers fixed eos_token_id say 2; those models pool at the
    # highest token id (the end-of-text token of the real vocabulary), the others at the first eos.
    position_B = (
      jnp.argmax(input_ids_BT, axis=-1) if eos == 2 else jnp.argmax(input_ids_BT == eos, axis=-1)
    )
    pooled_BD = jnp.take_along_axis(last_BTD, position_B[:, None, None], axis=1)[:, 0]
    embeds = self.text_projection(pooled_BD) if self.text_projection is not None else None
    return TextOutput(last_BTD, pooled_BD, states, embeds)


class CLIPVisionEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    self.class_embedding = nnx.Param(
      jax.random.normal(rngs.params(), (cfg.hidden_size,), param_dtype)
    )
    self.patch_embedding = Conv2d(
      cfg.num_channels,
      cfg.hidden_size,
      cfg.patch_size,
      stride=cfg.patch_size,
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.position_embedding = Embed(
      cfg.num_positions, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.dtype = dtype

  def __call__(self, pixels_BHWC):
    patches_BHWD = self.patch_embedding(pixels_BHWC)
    B, _, _, D = patches_BHWD.shape
    cls_B1D = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (B, 1, D))
    tokens_BTD = jnp.concatenate([cls_B1D, patches_BHWD.reshape(B, -1, D)], axis=1)
    return tokens_BTD + self.position_embedding(jnp.arange(tokens_BTD.shape[1]))


class CLIPVisionTransformer(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.embeddings = CLIPVisionEmbeddings(cfg, rngs=rngs, **kw)
    self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)  # sic
    self.encoder = CLIPEncoder(cfg, causal=False, rngs=rngs, **kw)
    self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)


class VisionOutput(NamedTuple):
  image_embeds: jax.Array  # [B, P]: visual_projection(post_layernorm(CLS)), not normalised
  last_hidden_state: jax.Array
  hidden_states: tuple  # pre-LN'd embeddings, then every layer; [-2] feeds IP-Adapter Plus


class CLIPVisionModelWithProjection(nnx.Module):
  """The CLIP image encoder of IP-Adapter (OpenCLIP ViT-H/14 or bigG for the released weights)."""

  def __init__(
    self, config: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    rngs = ParamKeys(rngs)
    self.config = config
    self.vision_model = CLIPVisionTransformer(
      config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.visual_projection = Linear(
      config.hidden_size,
      config.projection_dim,
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.dtype = dtype

  def __call__(self, pixel_values, *, layout: str = "NHWC") -> VisionOutput:
    """`pixel_values` as CLIPImageProcessor makes them: [B, H, W, 3] (or NCHW with layout)."""
    pixel_values = to_nhwc(pixel_values, layout)
    vm = self.vision_model
    states = vm.encoder(vm.pre_layrnorm(vm.embeddings(pixel_values.astype(self.dtype))))
    pooled_BD = vm.post_layernorm(states[-1][:, 0])
    return VisionOutput(self.visual_projection(pooled_BD), states[-1], states)
