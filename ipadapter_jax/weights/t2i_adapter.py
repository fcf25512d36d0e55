"""diffusers T2I-Adapter folders (config.json + diffusion_pytorch_model.safetensors) <->
T2IAdapter."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from ipadapter_jax.storage import atomic_path
from ipadapter_jax.weights.files import read_model_folder, write_safetensors
from ipadapter_jax.weights.folders import local_path, read_config
from ipadapter_jax.weights.tables import assign, export_named, named_variables, torch_name


def load_t2i_adapter(path: str, *, dtype=jnp.float32, param_dtype=None,
                     variant: str | None = None) -> T2IAdapter:
  """A T2IAdapter from a diffusers adapter folder or hub id ("owner/name[/folder]").

  Built abstractly and filled strictly: every weight must come from the file and every tensor in
  it must have a place. `dtype` is the compute dtype, `param_dtype` (default: `dtype`) that of the
  weights.
  """
  folder = local_path(path, allow_patterns=["config.json", "diffusion_pytorch_model*"])
  config = T2IAdapterConfig.from_diffusers(read_config(folder), source=f"{folder}/config.json")
  model = nnx.eval_shape(lambda: T2IAdapter(config, dtype=dtype, param_dtype=param_dtype or dtype,
                                            rngs=nnx.Rngs(0)))
  state_dict, source = read_model_folder(folder, "diffusion_pytorch_model", variant)
  assign(named_variables(model, torch_name), state_dict, source=source)
  return model


def save_t2i_adapter(model: T2IAdapter, folder: str, *, dtype=None) -> None:
  """Writes the adapter as a diffusers folder that `T2IAdapter.from_pretrained` reads."""
  with atomic_path(folder) as tmp:
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(model.config.to_diffusers(), f, indent=2)
    write_safetensors(os.path.join(tmp, "diffusion_pytorch_model.safetensors"),
                      export_named(named_variables(model, torch_name), dtype))
