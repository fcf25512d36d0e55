"""PyTorch references for the parity tests: tiny diffusers models with random weights on disk."""

from __future__ import annotations

import math

import numpy as np
import torch

# Tiny stand-ins for the three UNet families; each exercises different config paths.
SD15_LIKE = dict(
  block_out_channels=(32, 64, 64),
  layers_per_block=2,
  norm_num_groups=8,
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  cross_attention_dim=32,
  attention_head_dim=4,
  in_channels=4,
  out_channels=4,
  sample_size=16,
)
SD2_LIKE = dict(
  block_out_channels=(32, 64, 64),
  layers_per_block=1,
  norm_num_groups=8,
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  cross_attention_dim=48,
  attention_head_dim=(2, 4, 8),
  use_linear_projection=True,
  upcast_attention=True,
  in_channels=4,
  out_channels=4,
  sample_size=16,
)
SDXL_LIKE = dict(
  block_out_channels=(32, 64),
  layers_per_block=2,
  norm_num_groups=8,
  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
  transformer_layers_per_block=(1, 2),
  attention_head_dim=(2, 4),
  cross_attention_dim=40,
  use_linear_projection=True,
  addition_embed_type="text_time",
  addition_time_embed_dim=8,
  projection_class_embeddings_input_dim=24 + 6 * 8,
  in_channels=4,
  out_channels=4,
  sample_size=16,
)
SDXL_POOLED_DIM = 24


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Overwrites every parameter with seeded noise of a sensible scale (norm weights near 1).

  Default initialisations (zero biases, unit norm weights) would hide a mis-mapped weight.
  """
  g = torch.Generator().manual_seed(seed)
  norms = {
    name
    for name, m in module.named_modules()
    if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))
  }
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      owner, _, leaf = name.rpartition(".")
      if owner in norms and leaf == "weight":
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim <= 1:
        p.copy_(0.1 * noise)
      else:
        p.copy_(noise / math.sqrt(p[0].numel()))
  return module.eval()


def tiny_unet(config: dict, seed: int = 0):
  from diffusers import UNet2DConditionModel  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  return randomize_(UNet2DConditionModel(**config), seed)


def official_adapter(
  unet, num_tokens: int, embed_dim: int, seed: int, kind: str = "basic", **image_proj_kw
) -> dict:
  """Random IP-Adapter weights in the official nested layout for a diffusers `unet`."""
  C = unet.config.cross_attention_dim
  return {
    "image_proj": official_image_proj(
      kind, embed_dim, C, num_tokens=num_tokens, seed=seed, **image_proj_kw
    ),
    "ip_adapter": official_ip_layers(unet, C, seed + 1),
  }


def save_official(official: dict, path) -> None:
  """Writes official-layout adapter weights as one .safetensors file ("image_proj.x", ...)."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel

  save_file(
    {f"{s}.{k}": v.contiguous() for s, d in official.items() for k, v in d.items()}, str(path)
  )


def save_tiny_sdxl(folder):
  """A tiny SDXL pipeline folder (random weights, the word tokenizer, DDIM); returns its UNet."""
  from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline  # pylint: disable=import-outside-toplevel
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # pylint: disable=import-outside-toplevel

  from ipadapter_jax.tokenizer import write_word_tokenizer  # pylint: disable=import-outside-toplevel

  write_word_tokenizer(str(folder / "words"), WORDS, model_max_length=16)
  tokenizer = CLIPTokenizer.from_pretrained(str(folder / "words"))
  text_2 = CLIPTextConfig(
    **dict(TEXT_LIKE, hidden_size=8, num_attention_heads=2, projection_dim=SDXL_POOLED_DIM)
  )
  unet = tiny_unet(dict(SDXL_LIKE, cross_attention_dim=40), 3)
  StableDiffusionXLPipeline(
    vae=randomize_(AutoencoderKL(**VAE_LIKE), 0),
    text_encoder=randomize_(CLIPTextModel(CLIPTextConfig(**TEXT_LIKE)), 1),
    text_encoder_2=randomize_(CLIPTextModelWithProjection(text_2), 2),
    tokenizer=tokenizer,
    tokenizer_2=tokenizer,
    unet=unet,
    scheduler=DDIMScheduler(
      beta_start=0.00085,
      beta_end=0.012,
      beta_schedule="scaled_linear",
      clip_sample=False,
      set_alpha_to_one=False,
      steps_offset=1,
    ),
  ).save_pretrained(folder / "xl")
  return unet


def to_numpy(tree):
  if isinstance(tree, dict):
    return {k: to_numpy(v) for k, v in tree.items()}
  return tree.detach().cpu().numpy()


def set_ip_scale(unet, scales):
  """Sets diffusers' IP-Adapter scale of each cross-attention processor (in processor order)."""
  procs = [p for p in unet.attn_processors.values() if hasattr(p, "to_k_ip")]
  scales = np.broadcast_to(np.asarray(scales, np.float64), (len(procs),))
  for proc, scale in zip(procs, scales):
    proc.scale = [float(scale)]


def assert_close(actual, expected, *, rel: float = 2e-5, atol_cap: float = 1e-4):
  """Max abs error <= rel * max|expected| and <= atol_cap; returns the error for reporting."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  err = float(np.max(np.abs(actual - expected)))
  scale = float(np.max(np.abs(expected)))
  assert err <= min(rel * max(scale, 1.0), atol_cap), (
    f"max abs error {err:.3g} (output scale {scale:.3g})"
  )
  return err


TEXT_LIKE = dict(
  vocab_size=140,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=3,
  num_attention_heads=4,
  max_position_embeddings=16,
  bos_token_id=0,
  eos_token_id=1,
  pad_token_id=1,
  projection_dim=20,
)
VISION_LIKE = dict(
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=3,
  num_attention_heads=4,
  image_size=30,
  patch_size=6,
  projection_dim=24,
  hidden_act="gelu",
)
VAE_LIKE = dict(
  block_out_channels=(16, 32),
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
  layers_per_block=1,
  norm_num_groups=8,
  latent_channels=4,
)
WORDS = ["a", "red", "green", "blue", "circle", "square", "on", "background", "photo", "of"]


def official_image_proj(
  kind: str,
  embed_dim: int,
  context_dim: int,
  *,
  num_tokens: int = 4,
  resampler_dim: int = 64,
  heads: int = 1,
  seed: int = 0,
) -> dict:
  """Random `image_proj` weights of an official basic / plus / full_face file (PyTorch layout)."""
  g = torch.Generator().manual_seed(seed)

  def weight(*shape):
    return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

  def vec(n, centre=0.0):
    return centre + 0.1 * torch.randn(n, generator=g)

  E, C, D = embed_dim, context_dim, resampler_dim
  if kind == "basic":
    return {
      "proj.weight": weight(num_tokens * C, E),
      "proj.bias": vec(num_tokens * C),
      "norm.weight": vec(C, 1.0),
      "norm.bias": vec(C),
    }
  if kind == "full_face":
    return {
      "proj.0.weight": weight(E, E),
      "proj.0.bias": vec(E),
      "proj.2.weight": weight(C, E),
      "proj.2.bias": vec(C),
      "proj.3.weight": vec(C, 1.0),
      "proj.3.bias": vec(C),
    }
  inner = 64 * heads  # the official head size
  out = {
    "latents": torch.randn(1, num_tokens, D, generator=g) / math.sqrt(D),
    "proj_in.weight": weight(D, E),
    "proj_in.bias": vec(D),
    "proj_out.weight": weight(C, D),
    "proj_out.bias": vec(C),
    "norm_out.weight": vec(C, 1.0),
    "norm_out.bias": vec(C),
  }
  for j in range(4):  # diffusers' converter knows depth 4 only, as released
    out.update(
      {
        f"layers.{j}.0.norm1.weight": vec(D, 1.0),
        f"layers.{j}.0.norm1.bias": vec(D),
        f"layers.{j}.0.norm2.weight": vec(D, 1.0),
        f"layers.{j}.0.norm2.bias": vec(D),
        f"layers.{j}.0.to_q.weight": weight(inner, D),
        f"layers.{j}.0.to_kv.weight": weight(2 * inner, D),
        f"layers.{j}.0.to_out.weight": weight(D, inner),
        f"layers.{j}.1.0.weight": vec(D, 1.0),
        f"layers.{j}.1.0.bias": vec(D),
        f"layers.{j}.1.1.weight": weight(4 * D, D),
        f"layers.{j}.1.3.weight": weight(D, 4 * D),
      }
    )
  return out


def official_ip_layers(unet, context_dim: int, seed: int) -> dict:
  """Random `ip_adapter` weights for every cross-attention processor of a diffusers `unet`.

  The i of `{i}.to_k_ip.weight` counts diffusers' attention processors (attn1 and attn2 alike).
  """
  g = torch.Generator().manual_seed(seed)
  out = {}
  for i, name in enumerate(unet.attn_processors):
    if name.endswith("attn2.processor"):
      hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape[0]
      for proj in ("to_k_ip", "to_v_ip"):
        out[f"{i}.{proj}.weight"] = torch.randn(hidden, context_dim, generator=g) / math.sqrt(
          context_dim
        )
  return out


def jit_call(model, *args, **kwargs):
  """model(*args, **kwargs) compiled: far faster than op-by-op dispatch for a whole UNet.

  String keyword arguments (layouts) are static; everything else is traced.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  graphdef, state = nnx.split(model)
  static = {k: v for k, v in kwargs.items() if isinstance(v, str)}
  traced = {k: v for k, v in kwargs.items() if not isinstance(v, str)}
  run = jax.jit(lambda state, args, traced: nnx.merge(graphdef, state)(*args, **traced, **static))
  return run(state, args, traced)
