"""diffusers model folders (config.json + weights) <-> this project's models: the one loader and
writer every diffusers-format model goes through, and the UNet and VAE."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig
from ipadapter_jax.storage import atomic_path
from ipadapter_jax.weights.files import CheckpointError, read_model_folder, write_safetensors
from ipadapter_jax.weights.folders import HubId, model_patterns, read_config, resolve_subfolder
from ipadapter_jax.weights.ip_adapter import describe, load_ip_adapter, read_ip_adapter
from ipadapter_jax.weights.tables import assign, export_named, named_variables, torch_name

# Where this project's module names differ from diffusers' (everything else is identical).
UNET_RENAMES = (
  ("to_out", "to_out.0"),
  ("ff.geglu.proj", "ff.net.0.proj"),
  ("ff.proj_out", "ff.net.2"),
)

BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(AdapterParam))
WEIGHTS_NAME = "diffusion_pytorch_model"  # the weight file's stem in every diffusers model folder


def diffusers_patterns(variant: str | None, subfolder: str) -> list[str]:
  """What `load_model_folder` reads from a model folder, or from the `subfolder/` of a pipeline
  folder (`resolve_subfolder`), as hub allow-patterns."""
  return model_patterns(WEIGHTS_NAME, variant) + model_patterns(
    WEIGHTS_NAME, variant, folder=subfolder
  )


def unet_torch_name(path: tuple) -> str:
  """The diffusers state-dict key of a UNet parameter path."""
  return torch_name(path, UNET_RENAMES)


def load_model_folder(
  folder: str,
  config_cls,
  build,
  *,
  variant: str | None = None,
  name_fn=unet_torch_name,
  variables=nnx.Param,
  fix_keys=None,
  class_name: str | None = None,
):
  """A model from a diffusers model folder: config.json -> `config_cls.from_diffusers` ->
  `build(config)` created abstractly (no memory spent on a random initialisation) -> every
  weight of `variables` filled strictly from the folder's weights (`fix_keys` renames the state
  dict first). `class_name`: the `_class_name` config.json must name, if it names one."""
  source = f"{folder}/config.json"
  raw = read_config(folder)
  if class_name is not None and raw.get("_class_name", class_name) != class_name:
    raise CheckpointError(f"{source}: describes a {raw['_class_name']}, not a {class_name}")
  config = config_cls.from_diffusers(raw, source=source)
  model = nnx.eval_shape(lambda: build(config))
  state_dict, weights = read_model_folder(folder, WEIGHTS_NAME, variant)
  if fix_keys is not None:
    state_dict = fix_keys(state_dict)
  assign(named_variables(model, name_fn, variables), state_dict, source=weights)
  return model


def save_model_folder(
  model, folder: str, *, dtype=None, name_fn=unet_torch_name, variables=nnx.Param
) -> None:
  """Writes a model as a diffusers model folder: config.json + one safetensors file, complete or
  not at all."""
  with atomic_path(os.fspath(folder)) as tmp:
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(model.config.to_diffusers(), f, indent=2)
    write_safetensors(
      os.path.join(tmp, f"{WEIGHTS_NAME}.safetensors"),
      export_named(named_variables(model, name_fn, variables), dtype),
    )


def load_unet(
  path: str,
  *,
  adapter: AdapterConfig | None = None,
  ip_adapter: str | HubId | None = None,
  dtype=jnp.float32,
  param_dtype=None,
  variant: str | None = None,
  attention_implementation: str | None = None,
  seed: int = 0,
) -> UNet2DConditionModel:
  """A UNet from a diffusers `unet/` folder (or a pipeline folder holding one).

  The model is created abstractly, so no memory is spent on a random initialisation; every base
  weight must come from the folder (strict). `ip_adapter` names an official adapter file (a
  path, a hub file id or a `HubId`) to build and load the adapter from (its variant and sizes
  are read from the file). With only
  `adapter`, the adapter gets the training initialisation (`reset_adapter`).
  `dtype` is the compute dtype, `param_dtype` (default: `dtype`) that of the base weights.
  """
  ip_state = None
  if ip_adapter is not None:
    ip_state = read_ip_adapter(ip_adapter)
    detected = describe(ip_state, str(ip_adapter)).adapter
    if adapter is not None and adapter != detected:
      raise ValueError(f"{ip_adapter}: holds {detected}, but adapter={adapter} was asked for")
    adapter = detected
  model = load_model_folder(
    resolve_subfolder(path, "unet"),
    UNetConfig,
    lambda config: UNet2DConditionModel(
      config,
      adapter=adapter,
      dtype=dtype,
      param_dtype=param_dtype or dtype,
      attention_implementation=attention_implementation,
      rngs=nnx.Rngs(seed),
    ),
    variant=variant,
    variables=BASE_PARAMS,
  )
  if ip_state is not None:
    load_ip_adapter(model, ip_state, source=str(ip_adapter))
  elif adapter is not None:
    model.reset_adapter(nnx.Rngs(seed))
  return model


def save_unet(model: UNet2DConditionModel, folder: str, *, dtype=None) -> None:
  """Writes the base UNet (no adapter) as a diffusers folder: config.json + safetensors."""
  save_model_folder(model, folder, dtype=dtype, variables=BASE_PARAMS)


# Names diffusers used for the VAE's attention before 0.14; released VAEs still carry them.
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_vae_keys(state: dict) -> dict:
  out = {}
  for key, value in state.items():
    module, _, leaf = key.rpartition(".")
    owner, _, name = module.rpartition(".")
    if ".attentions." in key and name in _LEGACY_VAE_ATTENTION:
      key = f"{owner}.{_LEGACY_VAE_ATTENTION[name]}.{leaf}"
      if value.ndim == 4:  # stored as 1x1 convolutions
        value = value[:, :, 0, 0]
    out[key] = value
  return out


def load_vae(
  path: str, *, dtype=jnp.float32, param_dtype=None, variant: str | None = None
) -> AutoencoderKL:
  """An AutoencoderKL from a diffusers `vae/` folder (or a pipeline folder holding one)."""
  return load_model_folder(
    resolve_subfolder(path, "vae"),
    VAEConfig,
    lambda config: AutoencoderKL(
      config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0)
    ),
    variant=variant,
    fix_keys=_modern_vae_keys,
  )


def save_vae(model: AutoencoderKL, folder: str, *, dtype=None) -> None:
  """Writes the VAE as a diffusers folder: config.json + safetensors."""
  save_model_folder(model, folder, dtype=dtype)
