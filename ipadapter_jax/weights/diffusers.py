"""Loading diffusers model folders (config.json + weights) into this project's models."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
from ipadapter_jax.weights.files import CheckpointError, read_model_folder
from ipadapter_jax.weights.tables import assign, named_variables, torch_name

# Where this project's module names differ from diffusers' (everything else is identical).
UNET_RENAMES = (
    ("to_out", "to_out.0"),
    ("ff.geglu.proj", "ff.net.0.proj"),
    ("ff.proj_out", "ff.net.2"),
)

BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(AdapterParam))


def unet_torch_name(path: tuple) -> str:
  """The diffusers state-dict key of a UNet parameter path."""
  return torch_name(path, UNET_RENAMES)


def resolve_subfolder(path: str, subfolder: str) -> str:
  """`path` itself if it holds a config.json, else `path/subfolder` (a whole pipeline folder)."""
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  candidate = os.path.join(path, subfolder)
  if os.path.isfile(os.path.join(candidate, "config.json")):
    return candidate
  raise CheckpointError(f"{path}: neither it nor its '{subfolder}/' holds a config.json")


def read_config(folder: str) -> dict:
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f)


def load_unet(path: str, *, adapter: AdapterConfig | None = None, dtype=jnp.float32,
              param_dtype=None, variant: str | None = None,
              attention_implementation: str | None = None, seed: int = 0) -> UNet2DConditionModel:
  """A UNet from a diffusers `unet/` folder (or a pipeline folder holding one).

  The model is created abstractly, so no memory is spent on a random initialisation; every base
  weight must come from the folder (strict). With `adapter`, the adapter is initialised for
  training (`reset_adapter`); load released adapter weights with `weights.load_ip_adapter`.
  `dtype` is the compute dtype, `param_dtype` (default: `dtype`) that of the base weights.
  """
  folder = resolve_subfolder(path, "unet")
  config = UNetConfig.from_diffusers(read_config(folder))
  model = nnx.eval_shape(lambda: UNet2DConditionModel(
      config, adapter=adapter, dtype=dtype, param_dtype=param_dtype or dtype,
      attention_implementation=attention_implementation, rngs=nnx.Rngs(seed)))
  state_dict = read_model_folder(folder, "diffusion_pytorch_model", variant)
  assign(named_variables(model, unet_torch_name, BASE_PARAMS), state_dict, source=folder)
  if adapter is not None:
    model.reset_adapter(nnx.Rngs(seed))
  return model
