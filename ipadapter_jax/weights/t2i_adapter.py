"""diffusers T2I-Adapter folders (config.json + diffusion_pytorch_model.safetensors) <->
T2IAdapter."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from ipadapter_jax.weights.diffusers import WEIGHTS_NAME, load_model_folder, save_model_folder
from ipadapter_jax.weights.folders import HubId, local_path, model_patterns
from ipadapter_jax.weights.tables import torch_name


def load_t2i_adapter(
  path: str | HubId,
  *,
  dtype=jnp.float32,
  param_dtype=None,
  variant: str | None = None,
  revision: str | None = None,
) -> T2IAdapter:
  """A T2IAdapter from a diffusers adapter folder or hub id ("owner/name[/folder]"; `revision`
  pins its revision).

  Built abstractly and filled strictly: every weight must come from the file and every tensor in
  it must have a place. `dtype` is the compute dtype, `param_dtype` (default: `dtype`) that of the
  weights.
  """
  return load_model_folder(
    local_path(path, revision=revision, allow_patterns=model_patterns(WEIGHTS_NAME, variant)),
    T2IAdapterConfig,
    lambda config: T2IAdapter(
      config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0)
    ),
    variant=variant,
    name_fn=torch_name,
  )


def save_t2i_adapter(model: T2IAdapter, folder: str, *, dtype=None) -> None:
  """Writes the adapter as a diffusers folder that `T2IAdapter.from_pretrained` reads."""
  save_model_folder(model, folder, dtype=dtype, name_fn=torch_name)
