"""diffusers ControlNet folders (config.json + weights) <-> `ControlNetModel`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.controlnet import ControlNetConfig, ControlNetModel
from ipadapter_jax.weights.diffusers import diffusers_patterns, load_model_folder, save_model_folder
from ipadapter_jax.weights.folders import HubId, local_path, resolve_subfolder


def load_controlnet(
  path: str | HubId,
  *,
  dtype=jnp.float32,
  param_dtype=None,
  variant: str | None = None,
  revision: str | None = None,
  attention_implementation: str | None = None,
) -> ControlNetModel:
  """A ControlNet from a diffusers folder (or a pipeline folder holding `controlnet/`), or a
  hub id ("lllyasviel/sd-controlnet-canny"; `revision` pins its revision), strictly: every
  weight must come from the folder. `dtype` is the compute dtype, `param_dtype` (default:
  `dtype`) that of the weights.
  """
  # Hub ControlNet repos often hold several copies of the weights: fetch only the one read.
  root = local_path(
    path, revision=revision, allow_patterns=diffusers_patterns(variant, "controlnet")
  )
  return load_model_folder(
    resolve_subfolder(root, "controlnet"),
    ControlNetConfig,
    lambda config: ControlNetModel(
      config,
      dtype=dtype,
      param_dtype=param_dtype or dtype,
      attention_implementation=attention_implementation,
      rngs=nnx.Rngs(0),
    ),
    variant=variant,
    class_name="ControlNetModel",
  )


def save_controlnet(model: ControlNetModel, folder: str, *, dtype=None) -> None:
  """Writes the ControlNet as a diffusers folder: config.json + safetensors."""
  save_model_folder(model, folder, dtype=dtype)
