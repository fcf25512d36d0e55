"""PyTorch references for the parity tests: tiny diffusers models with random weights on disk."""

from __future__ import annotations

import math

import numpy as np
import torch

# Tiny stand-ins for the three UNet families; each exercises different config paths.
SD15_LIKE = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, in_channels=4, out_channels=4, sample_size=16)
SD2_LIKE = dict(
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48, attention_head_dim=(2, 4, 8), use_linear_projection=True,
    upcast_attention=True, in_channels=4, out_channels=4, sample_size=16)
SDXL_LIKE = dict(
    block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=40,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8, in_channels=4, out_channels=4,
    sample_size=16)
SDXL_POOLED_DIM = 24


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Overwrites every parameter with seeded noise of a sensible scale (norm weights near 1).

  Default initialisations (zero biases, unit norm weights) would hide a mis-mapped weight.
  """
  g = torch.Generator().manual_seed(seed)
  norms = {name for name, m in module.named_modules()
           if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
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


def official_adapter(unet, num_tokens: int, embed_dim: int, seed: int) -> dict:
  """Random IP-Adapter weights in the official nested layout for a diffusers `unet`.

  The i of `{i}.to_k_ip.weight` counts diffusers' attention processors (attn1 and attn2 alike).
  """
  g = torch.Generator().manual_seed(seed)
  C = unet.config.cross_attention_dim
  image_proj = {
      "proj.weight": torch.randn(num_tokens * C, embed_dim, generator=g) / math.sqrt(embed_dim),
      "proj.bias": 0.1 * torch.randn(num_tokens * C, generator=g),
      "norm.weight": 1.0 + 0.1 * torch.randn(C, generator=g),
      "norm.bias": 0.1 * torch.randn(C, generator=g),
  }
  ip_adapter = {}
  for i, name in enumerate(unet.attn_processors):
    if name.endswith("attn2.processor"):
      hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape[0]
      for proj in ("to_k_ip", "to_v_ip"):
        ip_adapter[f"{i}.{proj}.weight"] = torch.randn(hidden, C, generator=g) / math.sqrt(C)
  return {"image_proj": image_proj, "ip_adapter": ip_adapter}


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
  assert err <= min(rel * max(scale, 1.0), atol_cap), f"max abs error {err:.3g} (output scale {scale:.3g})"
  return err


TEXT_LIKE = dict(vocab_size=140, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                 eos_token_id=1, pad_token_id=1, projection_dim=20)
VISION_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   image_size=30, patch_size=6, projection_dim=24, hidden_act="gelu")
VAE_LIKE = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                latent_channels=4)
WORDS = ["a", "red", "green", "blue", "circle", "square", "on", "background", "photo", "of"]
