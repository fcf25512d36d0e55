"""diffusers ControlNet folders (config.json + weights) <-> `ControlNetModel`."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.controlnet import ControlNetConfig, ControlNetModel
from ipadapter_jax.weights.diffusers import _save_diffusers, unet_torch_name
from ipadapter_jax.weights.files import CheckpointError, read_model_folder
from ipadapter_jax.weights.folders import local_path, read_config, resolve_subfolder
from ipadapter_jax.weights.tables import assign, export_named, named_variables

WEIGHTS_NAME = "diffusion_pytorch_model"


def _hub_patterns(variant: str | None) -> list[str]:
  """Only the files `read_model_folder` may read: hub ControlNet repos often hold several copies."""
  stem = f"{WEIGHTS_NAME}.{variant}" if variant else WEIGHTS_NAME
  return ["config.json", f"{stem}.safetensors", f"{stem}.safetensors.index.json",
          f"{WEIGHTS_NAME}*-of-*.safetensors"]


def load_controlnet(path: str, *, dtype=jnp.float32, param_dtype=None, variant: str | None = None,
                    revision: str | None = None,
                    attention_implementation: str | None = None) -> ControlNetModel:
  """A ControlNet from a diffusers folder (or a pipeline folder holding `controlnet/`), or a
  hub id ("lllyasviel/sd-controlnet-canny").

  The model is created abstractly, so no memory is spent on a random initialisation; every
  weight must come from the folder (strict). `dtype` is the compute dtype, `param_dtype`
  (default: `dtype`) that of the weights.
  """
  folder = resolve_subfolder(local_path(path, revision=revision,
                                        allow_patterns=_hub_patterns(variant)), "controlnet")
  source = f"{folder}/config.json"
  raw = read_config(folder)
  kind = raw.get("_class_name", "ControlNetModel")
  if kind != "ControlNetModel":
    raise CheckpointError(f"{source}: describes a {kind}, not a ControlNetModel")
  config = ControlNetConfig.from_diffusers(raw, source=source)
  model = nnx.eval_shape(lambda: ControlNetModel(
      config, dtype=dtype, param_dtype=param_dtype or dtype,
      attention_implementation=attention_implementation, rngs=nnx.Rngs(0)))
  state_dict, weights = read_model_folder(folder, WEIGHTS_NAME, variant)
  assign(named_variables(model, unet_torch_name), state_dict, source=weights)
  return model


def save_controlnet(model: ControlNetModel, folder: str, *, dtype=None) -> None:
  """Writes the ControlNet as a diffusers folder: config.json + safetensors."""
  _save_diffusers(os.fspath(folder), model.config.to_diffusers(),
                  export_named(named_variables(model, unet_torch_name), dtype))
