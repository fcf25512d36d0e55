"""One call that opens a whole Stable Diffusion folder (and an image encoder) as JAX models."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax.numpy as jnp

from ipadapter_jax.models.adapters import IPAdapter
from ipadapter_jax.models.clip import CLIPTextModel, CLIPVisionModelWithProjection
from ipadapter_jax.models.controlnet import ControlNetModel
from ipadapter_jax.models.controlnet import check_fits as check_controlnet
from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.networks import Networks
from ipadapter_jax.models.t2i_adapter import T2IAdapter
from ipadapter_jax.models.t2i_adapter import check_fits as check_t2i_adapter
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.vae import AutoencoderKL
from ipadapter_jax.preprocessing import CLIPImageConfig
from ipadapter_jax.storage import atomic_path
from ipadapter_jax.tokenizer import load_tokenizer
from ipadapter_jax.weights.controlnet import load_controlnet
from ipadapter_jax.weights.diffusers import WEIGHTS_NAME, load_unet, load_vae, save_unet, save_vae
from ipadapter_jax.weights.files import CheckpointError
from ipadapter_jax.weights.folders import (
  TOKENIZER_FILES,
  HubId,
  local_path,
  model_patterns,
  read_config,
)
from ipadapter_jax.weights.ip_adapter import load_extra_adapter
from ipadapter_jax.weights.t2i_adapter import load_t2i_adapter
from ipadapter_jax.weights.transformers import (
  TRANSFORMERS_WEIGHTS_NAME,
  clip_patterns,
  load_clip_text,
  load_clip_vision,
  save_clip,
)

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")  # no vae: a pixel-space model
OPTIONAL = ("text_encoder_2", "tokenizer_2")
# The weight file stem of each model component the loader reads.
MODEL_STEMS = {
  "unet": WEIGHTS_NAME,
  "vae": WEIGHTS_NAME,
  "text_encoder": TRANSFORMERS_WEIGHTS_NAME,
  "text_encoder_2": TRANSFORMERS_WEIGHTS_NAME,
}


def pipeline_patterns(variant: str | None) -> list[str]:
  """The files `load_stable_diffusion` reads from a pipeline repository, as hub allow-patterns:
  model_index.json, each component's config and safetensors weights of `variant` (not the
  root single-file checkpoints, the safety checker or other formats), the tokenizers and the
  scheduler config. Components a repository lacks match nothing."""
  patterns = ["model_index.json", "scheduler/scheduler_config.json"]
  for folder, stem in MODEL_STEMS.items():
    patterns += model_patterns(stem, variant, folder=folder)
  for folder in ("tokenizer", "tokenizer_2"):
    patterns += [f"{folder}/{name}" for name in TOKENIZER_FILES]
  return patterns


@dataclasses.dataclass
class StableDiffusion:
  """The frozen parts around an IP-Adapter, as loaded from a diffusers pipeline folder."""

  unet: UNet2DConditionModel
  vae: AutoencoderKL | None  # None for a pixel-space model (the toy world's)
  text_encoder: CLIPTextModel
  tokenizer: Any
  scheduler_config: dict
  text_encoder_2: CLIPTextModel | None = None
  tokenizer_2: Any = None
  image_encoder: CLIPVisionModelWithProjection | None = None
  image_processor: CLIPImageConfig | None = None
  model_index: dict = dataclasses.field(default_factory=dict)
  extra_adapters: tuple[IPAdapter, ...] = ()  # the second and later adapters, beside the UNet's
  controlnets: tuple[ControlNetModel, ...] = ()
  t2i_adapter: T2IAdapter | None = None

  @property
  def is_sdxl(self) -> bool:
    return self.text_encoder_2 is not None

  def networks(self) -> Networks:
    """The networks as one NNX graph (sharing these modules: updating one updates the other)."""
    return Networks(
      unet=self.unet,
      vae=self.vae,
      text_encoder=self.text_encoder,
      text_encoder_2=self.text_encoder_2,
      image_encoder=self.image_encoder,
      extra_adapters=self.extra_adapters,
      controlnets=self.controlnets,
      t2i_adapter=self.t2i_adapter,
    )

  def adapters(self) -> list:
    """Every adapter in use, in load order (`Networks.adapters`)."""
    return self.networks().adapters()


def _listed(index: dict, name: str) -> bool:
  entry = index.get(name)
  return isinstance(entry, (list, tuple)) and entry[0] is not None


def _component(root: str, name: str) -> str:
  folder = os.path.join(root, name)
  if not os.path.isdir(folder):
    raise CheckpointError(
      f"{root}/model_index.json lists '{name}' but the folder {folder} is missing"
    )
  return folder


def _listing(value) -> list:
  """One source or a sequence of them as a list (a string or a `HubId` is one source)."""
  return [value] if isinstance(value, (str, HubId)) else list(value or ())


def load_stable_diffusion(
  path_or_id: str | HubId,
  *,
  image_encoder: str | HubId | None = None,
  adapter: AdapterConfig | None = None,
  ip_adapter: str | HubId | Sequence[str | HubId] | None = None,
  dtype=jnp.float32,
  param_dtype=None,
  variant: str | None = None,
  revision: str | None = None,
  seed: int = 0,
  attention_implementation: str | None = None,
  controlnet: str | HubId | Sequence[str | HubId] | None = None,
  t2i_adapter: str | HubId | None = None,
) -> StableDiffusion:
  """Loads unet, vae, text encoder(s), tokenizer(s) and the scheduler config of a diffusers
  Stable Diffusion folder or hub id, and optionally a CLIP image encoder folder or hub id
  ("h94/IP-Adapter/models/image_encoder"). `ip_adapter` (an official file: a path, a hub file
  id such as "h94/IP-Adapter/models/ip-adapter_sd15.safetensors", or a `HubId`) or `adapter` (a
  shape, for training) builds the UNet with an adapter; a list of files loads the first into
  the UNet and the others as `extra_adapters`, all applied together.

  A hub download fetches only what is read (`pipeline_patterns`). `variant` ("fp16") selects
  the weight files of every diffusers component, ControlNets included; `revision` pins the
  base model's revision; the other sources pin theirs as `HubId(..., revision=...)`.

  `param_dtype=jnp.bfloat16` casts the weights on load; `dtype` is the compute dtype.
  `attention_implementation` forces an attention kernel ("xla", "chunked", "cudnn", "splash");
  None chooses per platform (ipadapter_jax/models/attention_kernels.py).
  `controlnet` (a folder or hub id, or a list of them) and `t2i_adapter` (an SDXL or SD1.5
  T2I-Adapter folder) add structure control; each is checked to fit the UNet.
  """
  root = local_path(path_or_id, revision=revision, allow_patterns=pipeline_patterns(variant))
  index = read_config(root, "model_index.json")
  for name in REQUIRED:
    if not _listed(index, name):
      raise CheckpointError(f"{root}/model_index.json: required component '{name}' is missing")
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  files = _listing(ip_adapter)
  parts = dict(
    unet=load_unet(
      _component(root, "unet"),
      adapter=adapter,
      ip_adapter=files[0] if files else None,
      variant=variant,
      seed=seed,
      attention_implementation=attention_implementation,
      **kw,
    ),
    vae=load_vae(_component(root, "vae"), variant=variant, **kw) if _listed(index, "vae") else None,
    text_encoder=load_clip_text(_component(root, "text_encoder"), variant=variant, **kw),
    tokenizer=load_tokenizer(_component(root, "tokenizer")),
    scheduler_config=read_config(_component(root, "scheduler"), "scheduler_config.json"),
    model_index=index,
  )
  parts["extra_adapters"] = tuple(load_extra_adapter(parts["unet"], f) for f in files[1:])
  unet_config = parts["unet"].config
  nets = _listing(controlnet)
  parts["controlnets"] = tuple(load_controlnet(n, variant=variant, **kw) for n in nets)
  for name, net in zip(nets, parts["controlnets"]):
    check_controlnet(net.config, unet_config, source=f"controlnet {name}")
  if t2i_adapter is not None:
    parts["t2i_adapter"] = load_t2i_adapter(t2i_adapter, **kw)
    vae = parts["vae"]
    check_t2i_adapter(
      parts["t2i_adapter"].config,
      unet_config,
      source=f"T2I-Adapter {t2i_adapter}",
      vae_scale_factor=1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1),
    )
  if _listed(index, "text_encoder_2"):
    parts["text_encoder_2"] = load_clip_text(
      _component(root, "text_encoder_2"), variant=variant, **kw
    )
  if _listed(index, "tokenizer_2"):
    parts["tokenizer_2"] = load_tokenizer(_component(root, "tokenizer_2"))
  if image_encoder is not None:
    encoder_dir = local_path(image_encoder, allow_patterns=clip_patterns())
    parts["image_encoder"] = load_clip_vision(encoder_dir, **kw)
    parts["image_processor"] = CLIPImageConfig.from_folder(encoder_dir)
  return StableDiffusion(**parts)


def save_stable_diffusion(sd: StableDiffusion, folder: str, *, dtype=None) -> None:
  """Writes the base models, tokenizers and scheduler as a diffusers pipeline folder (the adapter
  is not part of it: see `save_ip_adapter`). `dtype` casts the weights (e.g. np.float16)."""
  with atomic_path(folder) as tmp:
    os.makedirs(tmp)
    save_unet(sd.unet, os.path.join(tmp, "unet"), dtype=dtype)
    if sd.vae is not None:
      save_vae(sd.vae, os.path.join(tmp, "vae"), dtype=dtype)
    encoders = [
      ("text_encoder", sd.text_encoder, sd.tokenizer),
      ("text_encoder_2", sd.text_encoder_2, sd.tokenizer_2),
    ]
    for name, encoder, tokenizer in encoders:
      if encoder is not None:
        save_clip(encoder, os.path.join(tmp, name), dtype=dtype)
        tokenizer.save_pretrained(os.path.join(tmp, name.replace("text_encoder", "tokenizer")))
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(sd.scheduler_config, f, indent=2)
    index = dict(sd.model_index) or {
      "_class_name": "StableDiffusionXLPipeline" if sd.is_sdxl else "StableDiffusionPipeline"
    }
    index.update(
      unet=["diffusers", "UNet2DConditionModel"],
      scheduler=["diffusers", sd.scheduler_config.get("_class_name", "DDIMScheduler")],
    )
    if sd.vae is not None:
      index["vae"] = ["diffusers", "AutoencoderKL"]
    for name, encoder, _ in encoders:
      if encoder is not None:
        index[name] = ["transformers", encoder.config.to_transformers()["architectures"][0]]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
      json.dump(index, f, indent=2)
