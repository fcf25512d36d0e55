"""Official IP-Adapter checkpoints (`ip-adapter*.bin` / `.safetensors`) <-> this project's UNet.

The official file holds `image_proj.*` (the projection, PyTorch layout and module names) and
`ip_adapter.{i}.to_k_ip.weight` / `.to_v_ip.weight`, where i is the position of the layer's
processor in diffusers' `attn_processors` order: attn1 and attn2 alternate (odd i are the
cross-attention layers), blocks in registration order down, up, mid. The UNet's
`decoupled_layers()` lists the layers in exactly that order, so layer k has i = 2k + 1.
`.bin` files nest the two sections ({"image_proj": {...}, "ip_adapter": {...}}); `.safetensors`
files flatten them with the section as a key prefix.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
from flax import nnx

from ipadapter_jax.models.adapters import IPAdapter
from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.weights.files import (
  CheckpointError,
  read_weight_file,
  write_safetensors,
  write_torch_pickle,
)
from ipadapter_jax.weights.folders import HubId, file_in, local_file
from ipadapter_jax.weights.tables import (
  NamedVariable,
  assign,
  export_named,
  named_variables,
  torch_name,
)

SECTIONS = ("image_proj", "ip_adapter")
_LAYER_KEY = re.compile(r"ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight")


@dataclasses.dataclass(frozen=True)
class AdapterFileInfo:
  """What an official file holds, read from its keys and shapes."""

  adapter: AdapterConfig
  context_dim: int  # C, the UNet's cross_attention_dim
  num_layers: int  # decoupled cross-attention layers (16 for SD1.5, 70 for SDXL)
  num_params: int
  dtype: np.dtype

  def summary(self) -> str:
    a = self.adapter
    tokens = "one per input token" if a.kind == "full_face" else f"{a.num_tokens} tokens"
    return (
      f"{a.kind} IP-Adapter, {tokens}, E={a.embed_dim}, C={self.context_dim}, "
      f"{self.num_layers} layers, {self.num_params:,} parameters, {self.dtype}"
    )


def adapter_variables(model: UNet2DConditionModel | IPAdapter) -> dict[str, NamedVariable]:
  """{official key: variable} for every adapter weight of `model` (a UNet's own adapter or an
  `IPAdapter`: both list their layers by `decoupled_layers()`)."""
  if model.image_proj is None:
    raise ValueError("this UNet was built without an adapter")
  table = named_variables(
    model.image_proj, lambda path: "image_proj." + torch_name(path), AdapterParam
  )
  for k, layer in enumerate(model.decoupled_layers()):
    i = 2 * k + 1
    table[f"ip_adapter.{i}.to_k_ip.weight"] = NamedVariable(layer.to_k_ip.kernel, "kernel")
    table[f"ip_adapter.{i}.to_v_ip.weight"] = NamedVariable(layer.to_v_ip.kernel, "kernel")
  return table


def flatten_official(state: dict, source: str) -> dict[str, np.ndarray]:
  """The official nested form as one flat prefixed dict (flat input is checked and kept)."""
  if state and set(state) <= set(SECTIONS) and all(isinstance(v, dict) for v in state.values()):
    flat = {f"{section}.{key}": value for section in state for key, value in state[section].items()}
  else:
    flat = dict(state)
  for key in flat:
    if key.split(".", 1)[0] not in SECTIONS:
      raise CheckpointError(
        f"{source}: unexpected key '{key}': an IP-Adapter file holds only "
        "'image_proj.*' and 'ip_adapter.*'"
      )
  return flat


def read_ip_adapter(path: str | HubId, *, revision: str | None = None) -> dict[str, np.ndarray]:
  """An official IP-Adapter file (.bin or .safetensors) as a flat prefixed dict: a local file,
  or one downloaded from the hub ("h94/IP-Adapter/models/ip-adapter_sd15.safetensors" or a
  `HubId`; `revision` pins a string id's revision)."""
  return flatten_official(read_weight_file(local_file(path, revision=revision)), str(path))


def _get(state: dict, key: str, source: str, ndim: int) -> np.ndarray:
  if key not in state:
    raise CheckpointError(f"{source}: key '{key}' is missing")
  if state[key].ndim != ndim:
    raise CheckpointError(
      f"{source}: key '{key}' has shape {list(state[key].shape)}, expected {ndim} dimensions"
    )
  return state[key]


def describe(state: dict[str, np.ndarray], source: str = "IP-Adapter") -> AdapterFileInfo:
  """Detects the variant, N, E, C and the number of layers from a flat official state dict."""
  get = lambda key, ndim: _get(state, "image_proj." + key, source, ndim)
  if "image_proj.latents" in state:
    _, tokens, dim = get("latents", 3).shape
    context_dim = get("proj_out.weight", 2).shape[0]
    depth = len({k.split(".")[2] for k in state if k.startswith("image_proj.layers.")})
    inner = get("layers.0.0.to_q.weight", 2).shape[0]
    if inner % 64:
      raise CheckpointError(
        f"{source}: 'image_proj.layers.0.0.to_q.weight' has {inner} rows, "
        "not a multiple of the official head size 64"
      )
    adapter = AdapterConfig(
      num_tokens=tokens,
      embed_dim=get("proj_in.weight", 2).shape[1],
      kind="plus",
      resampler_dim=dim,
      resampler_depth=depth,
      resampler_heads=inner // 64,
      resampler_ff_mult=get("layers.0.1.1.weight", 2).shape[0] // dim,
    )
  elif "image_proj.proj.3.weight" in state:
    context_dim = get("proj.3.weight", 1).shape[0]
    adapter = AdapterConfig(
      num_tokens=1, embed_dim=get("proj.0.weight", 2).shape[1], kind="full_face"
    )
  elif "image_proj.proj.weight" in state:
    context_dim = get("norm.weight", 1).shape[0]
    rows, embed_dim = get("proj.weight", 2).shape
    if rows % context_dim:
      raise CheckpointError(
        f"{source}: 'image_proj.proj.weight' has {rows} rows, not a "
        f"multiple of C={context_dim} (from 'image_proj.norm.weight')"
      )
    adapter = AdapterConfig(num_tokens=rows // context_dim, embed_dim=embed_dim)
  elif any(
    k.startswith("image_proj.perceiver_resampler.") or k == "image_proj.proj.0.weight"
    for k in state
  ):
    raise CheckpointError(
      f"{source}: a FaceID adapter (identity embedding + LoRA); only the "
      "basic, plus and full_face variants are supported"
    )
  else:
    first = next(iter(sorted(state)), "(no keys)")
    raise CheckpointError(f"{source}: not an IP-Adapter image projection (first key '{first}')")
  layers = sorted({int(m.group(1)) for k in state if (m := _LAYER_KEY.fullmatch(k))})
  expected = list(range(1, 2 * len(layers), 2))
  if layers != expected:
    bad = next(i for i, e in zip(layers + [None], expected + [None]) if i != e)
    raise CheckpointError(
      f"{source}: layer indices must be 1, 3, 5, ...; found "
      f"'ip_adapter.{bad}.to_k_ip.weight' out of sequence"
    )
  return AdapterFileInfo(
    adapter,
    context_dim,
    len(layers),
    sum(int(np.prod(v.shape)) for v in state.values()),
    next(iter(state.values())).dtype,
  )


def check_fits(info: AdapterFileInfo, model: UNet2DConditionModel, source: str):
  """Raises naming the mismatch when a file's adapter is not the one `model` was built with."""
  expected = model.adapter_config
  if expected is None:
    raise ValueError(
      "this UNet was built without an adapter; build it with "
      f"adapter={info.adapter} (or use load_unet(..., ip_adapter=path))"
    )
  layers = len(model.decoupled_layers())
  context_dim = model.decoupled_layers()[0].to_k_ip.kernel.shape[0]
  if info.num_layers != layers:
    key = f"ip_adapter.{2 * min(info.num_layers, layers) + 1}.to_k_ip.weight"
    raise CheckpointError(
      f"{source}: {info.num_layers} cross-attention layers for a UNet with "
      f"{layers} (first offending key '{key}')"
    )
  if info.context_dim != context_dim:
    raise CheckpointError(
      f"{source}: C={info.context_dim} for a UNet with cross_attention_dim "
      f"{context_dim} (key 'ip_adapter.1.to_k_ip.weight' has "
      f"{info.context_dim} columns, expected {context_dim})"
    )
  if info.adapter.kind != expected.kind:
    raise CheckpointError(
      f"{source}: a '{info.adapter.kind}' adapter, the model was built for '{expected.kind}'"
    )


def load_ip_adapter(
  model: UNet2DConditionModel | IPAdapter,
  weights: str | HubId | dict,
  *,
  source: str | None = None,
  subfolder: str | None = None,
  weight_name: str | None = None,
  revision: str | None = None,
):
  """Sets `model`'s adapter from an official file or an (official, possibly nested) dict.

  The file is named as diffusers' `load_ip_adapter` names it: a path or hub file id alone, or a
  local folder or hub repository with `subfolder` and `weight_name` ("h94/IP-Adapter",
  subfolder="models", weight_name="ip-adapter_sd15.safetensors"); `revision` pins a hub file's
  revision.
  """
  if isinstance(weights, dict):
    source = source or "IP-Adapter state dict"
    state = flatten_official(weights, source)
  else:
    weights = file_in(weights, subfolder=subfolder, weight_name=weight_name)
    source = source or str(weights)
    state = read_ip_adapter(weights, revision=revision)
  check_fits(describe(state, source), model, source)
  assign(adapter_variables(model), state, source=source)


def load_extra_adapter(unet: UNet2DConditionModel, path: str | HubId) -> IPAdapter:
  """An official file (a path, a hub file id or a `HubId`) as an `IPAdapter` for `unet`'s
  topology, to use beside its own adapter."""
  state = read_ip_adapter(path)
  config = describe(state, str(path)).adapter
  shapes = [(layer.to_k.kernel.shape[1], layer.heads) for layer in unet.cross_attention_layers()]
  adapter = nnx.eval_shape(
    lambda: IPAdapter(
      config, unet.config.cross_attention_dim[0], shapes, dtype=unet.dtype, rngs=nnx.Rngs(0)
    )
  )
  load_ip_adapter(adapter, state, source=str(path))
  return adapter


def ip_adapter_state_dict(
  model: UNet2DConditionModel | IPAdapter, dtype=np.float32
) -> dict[str, np.ndarray]:
  """The adapter as an official flat state dict (PyTorch layout), layers in index order."""
  if model.adapter_config is not None and model.adapter_config.attention != "decoupled":
    raise ValueError(
      "the official format holds decoupled adapters only; this one is "
      f"'{model.adapter_config.attention}' (keep its Orbax checkpoint instead)"
    )
  return export_named(adapter_variables(model), dtype)


def save_ip_adapter(model: UNet2DConditionModel | IPAdapter, path: str, *, dtype=np.float16) -> int:
  """Writes the adapter in the official format (.safetensors flat, .bin nested); returns bytes.

  The released files are float16, which is the default here too; pass np.float32 to keep full
  precision. The file appears only once it is complete.
  """
  state = ip_adapter_state_dict(model, dtype)
  if path.endswith(".safetensors"):
    write_safetensors(path, state)
  elif path.endswith(".bin"):
    nested = {section: {} for section in SECTIONS}
    for key, value in state.items():
      section, name = key.split(".", 1)
      nested[section][name] = value
    write_torch_pickle(path, nested)
  else:
    raise ValueError(f"{path}: the official format is .safetensors or .bin")
  return os.path.getsize(path)
