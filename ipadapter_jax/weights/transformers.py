"""transformers CLIP folders (text encoders, the IP-Adapter image encoder) <-> this project."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.models.clip import (
  CLIPTextConfig,
  CLIPTextModel,
  CLIPVisionConfig,
  CLIPVisionModelWithProjection,
)
from ipadapter_jax.storage import atomic_path
from ipadapter_jax.weights.files import read_model_folder, write_safetensors
from ipadapter_jax.weights.folders import TOKENIZER_FILES, model_patterns, read_config
from ipadapter_jax.weights.tables import assign, export_named, named_variables, torch_name

# Buffers that older transformers versions saved with the weights; they carry no parameters.
LEGACY_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
TRANSFORMERS_WEIGHTS_NAME = "model"  # the weight file stem of every transformers model folder


def clip_patterns(*, tokenizer: bool = False, variant: str | None = None) -> list[str]:
  """The files the CLIP loaders read from a folder, as hub allow-patterns: config, weights and
  image preprocessing settings, and with `tokenizer` the tokenizer files (a CLIPModel folder)."""
  return [
    *model_patterns(TRANSFORMERS_WEIGHTS_NAME, variant),
    "preprocessor_config.json",
    *(TOKENIZER_FILES if tokenizer else ()),
  ]


def _canonical_text_keys(state: dict) -> dict:
  """transformers 5 saves a bare CLIPTextModel without the `text_model.` prefix that every
  earlier checkpoint (and CLIPTextModelWithProjection) has; both forms are accepted."""
  return {
    (key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key): state[
      key
    ]
    for key in state
  }


def load_clip_text(
  folder: str,
  *,
  with_projection: bool | None = None,
  dtype=jnp.float32,
  param_dtype=None,
  variant: str | None = None,
) -> CLIPTextModel:
  """A CLIPTextModel / CLIPTextModelWithProjection from a transformers folder.

  `with_projection=None` decides from the config's `architectures`.
  """
  raw = read_config(folder)
  if with_projection is None:
    with_projection = "CLIPTextModelWithProjection" in raw.get("architectures", [])
  config = CLIPTextConfig.from_transformers(
    raw, with_projection=with_projection, source=f"{folder}/config.json"
  )
  model = nnx.eval_shape(
    lambda: CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0))
  )
  state, source = read_model_folder(folder, TRANSFORMERS_WEIGHTS_NAME, variant)
  if "text_config" in raw:  # a whole CLIPModel folder: take the text tower (and its projection)
    keep = ("text_model.", "text_projection.") if with_projection else ("text_model.",)
    state = {k: state[k] for k in state if k.startswith(keep)}  # reads only the kept tensors
  else:
    state = _canonical_text_keys(state)
  assign(named_variables(model, torch_name), state, source=source, ignore=LEGACY_BUFFERS)
  return model


def load_clip_vision(
  folder: str, *, dtype=jnp.float32, param_dtype=None, variant: str | None = None
) -> CLIPVisionModelWithProjection:
  """A CLIPVisionModelWithProjection (e.g. IP-Adapter's `image_encoder/`) from a folder."""
  raw = read_config(folder)
  config = CLIPVisionConfig.from_transformers(raw, source=f"{folder}/config.json")
  model = nnx.eval_shape(
    lambda: CLIPVisionModelWithProjection(
      config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0)
    )
  )
  state, source = read_model_folder(folder, TRANSFORMERS_WEIGHTS_NAME, variant)
  if "vision_config" in raw:  # a whole CLIPModel folder: take the vision tower only
    state = {k: state[k] for k in state if k.startswith(("vision_model.", "visual_projection."))}
  assign(named_variables(model, torch_name), state, source=source, ignore=LEGACY_BUFFERS)
  return model


def save_clip(
  model: CLIPTextModel | CLIPVisionModelWithProjection, folder: str, *, dtype=None
) -> None:
  """Writes a CLIP tower as a transformers folder: config.json + model.safetensors
  (keys with the `text_model.` / `vision_model.` prefixes every transformers version reads)."""
  state = export_named(named_variables(model, torch_name), dtype)
  with atomic_path(folder) as tmp:
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(model.config.to_transformers(), f, indent=2)
    write_safetensors(os.path.join(tmp, "model.safetensors"), state)


def save_clip_model(
  text: CLIPTextModel,
  vision: CLIPVisionModelWithProjection,
  folder: str,
  *,
  logit_scale: float,
  tokenizer=None,
  processor=None,
  dtype=None,
) -> None:
  """Writes both towers as one transformers CLIPModel folder (the form of openai/clip-vit-*),
  with the tokenizer and the image processor settings when given."""
  if text.config.projection_dim != vision.config.projection_dim:
    raise ValueError(
      f"a CLIPModel needs one projection size, got text "
      f"{text.config.projection_dim} and vision {vision.config.projection_dim}"
    )
  state = {
    **export_named(named_variables(text, torch_name), dtype),
    **export_named(named_variables(vision, torch_name), dtype),
    "logit_scale": np.asarray(logit_scale, dtype or np.float32),
  }
  towers = {}  # each tower keeps projection_dim: a lone tower loaded from the folder reads it
  for name, model in (("text_config", text), ("vision_config", vision)):
    towers[name] = {k: v for k, v in model.config.to_transformers().items() if k != "architectures"}
  config = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": text.config.projection_dim,
    "logit_scale_init_value": float(logit_scale),
    **towers,
  }
  with atomic_path(folder) as tmp:
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    write_safetensors(os.path.join(tmp, "model.safetensors"), state)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    if processor is not None:
      with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(processor.to_dict(), f, indent=2)
