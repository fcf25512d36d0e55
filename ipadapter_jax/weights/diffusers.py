"""Loading diffusers model folders (config.json + weights) into this project's models."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig
from ipadapter_jax.weights.files import read_model_folder
from ipadapter_jax.weights.folders import read_config, resolve_subfolder
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
  config = UNetConfig.from_diffusers(read_config(folder), source=f"{folder}/config.json")
  model = nnx.eval_shape(lambda: UNet2DConditionModel(
      config, adapter=adapter, dtype=dtype, param_dtype=param_dtype or dtype,
      attention_implementation=attention_implementation, rngs=nnx.Rngs(seed)))
  state_dict, source = read_model_folder(folder, "diffusion_pytorch_model", variant)
  assign(named_variables(model, unet_torch_name, BASE_PARAMS), state_dict, source=source)
  if adapter is not None:
    model.reset_adapter(nnx.Rngs(seed))
  return model


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


def load_vae(path: str, *, dtype=jnp.float32, param_dtype=None,
             variant: str | None = None) -> AutoencoderKL:
  """An AutoencoderKL from a diffusers `vae/` folder (or a pipeline folder holding one)."""
  folder = resolve_subfolder(path, "vae")
  config = VAEConfig.from_diffusers(read_config(folder), source=f"{folder}/config.json")
  model = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype,
                                               param_dtype=param_dtype or dtype,
                                               rngs=nnx.Rngs(0)))
  state_dict, source = read_model_folder(folder, "diffusion_pytorch_model", variant)
  assign(named_variables(model, unet_torch_name), _modern_vae_keys(state_dict), source=source)
  return model
