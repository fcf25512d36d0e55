"""Official IP-Adapter checkpoints (`ip-adapter_*.bin` / `.safetensors`) <-> this project's UNet.

The official file holds `image_proj.*` (the projection, PyTorch layout) and
`ip_adapter.{i}.to_k_ip.weight` / `.to_v_ip.weight`, where i is the position of the layer's
processor in diffusers' `attn_processors` order: attn1 and attn2 alternate (odd i are the
cross-attention layers), blocks in registration order down, up, mid. The UNet's
`decoupled_layers()` lists the layers in exactly that order, so layer k has i = 2k + 1.
"""

from __future__ import annotations

import numpy as np

from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.weights.files import CheckpointError, read_weight_file
from ipadapter_jax.weights.tables import (NamedVariable, assign, export_named, named_variables,
                                          torch_name)

SECTIONS = ("image_proj", "ip_adapter")


def adapter_variables(model: UNet2DConditionModel) -> dict[str, NamedVariable]:
  """{official key: variable} for every adapter weight of `model`."""
  if model.image_proj is None:
    raise ValueError("this UNet was built without an adapter")
  table = named_variables(model.image_proj, lambda path: "image_proj." + torch_name(path),
                          AdapterParam)
  for k, layer in enumerate(model.decoupled_layers()):
    i = 2 * k + 1
    table[f"ip_adapter.{i}.to_k_ip.weight"] = NamedVariable(layer.to_k_ip.kernel, "kernel")
    table[f"ip_adapter.{i}.to_v_ip.weight"] = NamedVariable(layer.to_v_ip.kernel, "kernel")
  return table


def flatten_official(state: dict, source: str) -> dict[str, np.ndarray]:
  """The official nested `{"image_proj": {...}, "ip_adapter": {...}}` as one flat prefixed dict."""
  if set(state) <= set(SECTIONS):
    flat = {f"{section}.{key}": value for section in state for key, value in state[section].items()}
  else:
    flat = dict(state)
  for key in flat:
    if key.split(".", 1)[0] not in SECTIONS:
      raise CheckpointError(f"{source}: unexpected key '{key}': an IP-Adapter file holds only "
                            "'image_proj.*' and 'ip_adapter.*'")
  return flat


def read_ip_adapter(path: str) -> dict[str, np.ndarray]:
  """An official IP-Adapter file (.bin or .safetensors) as a flat prefixed dict."""
  return flatten_official(read_weight_file(path), path)


def adapter_config_of(state: dict[str, np.ndarray], context_dim: int) -> AdapterConfig:
  """The adapter shape a flat official state dict describes, for a UNet of `context_dim`."""
  weight = state.get("image_proj.proj.weight")
  if weight is None:
    raise CheckpointError("not a basic IP-Adapter: 'image_proj.proj.weight' is missing")
  tokens, rem = divmod(weight.shape[0], context_dim)
  if rem:
    raise CheckpointError(f"'image_proj.proj.weight' has {weight.shape[0]} rows, not a multiple "
                          f"of the UNet's cross_attention_dim {context_dim}")
  return AdapterConfig(num_tokens=tokens, embed_dim=weight.shape[1])


def load_ip_adapter(model: UNet2DConditionModel, weights: str | dict, *, source: str | None = None):
  """Sets `model`'s adapter from an official file path or an (official, possibly nested) dict."""
  if isinstance(weights, str):
    source = source or weights
    state = read_ip_adapter(weights)
  else:
    source = source or "IP-Adapter state dict"
    state = flatten_official(weights, source)
  assign(adapter_variables(model), state, source=source)


def ip_adapter_state_dict(model: UNet2DConditionModel, dtype=np.float32) -> dict[str, np.ndarray]:
  """The adapter as an official flat state dict (PyTorch layout)."""
  return export_named(adapter_variables(model), dtype)
