"""CLIP text and vision towers against transformers, and loading their folders."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (
  CLIPConfig,
  CLIPModel,
  CLIPTextConfig,
  CLIPTextModel,
  CLIPTextModelWithProjection,
  CLIPVisionConfig,
  CLIPVisionModelWithProjection,
)

from ipadapter_jax.models import clip
from ipadapter_jax.models.released import CLIP_L14_TEXT, OPENCLIP_BIGG14_TEXT, OPENCLIP_H14_VISION
from ipadapter_jax.weights import CheckpointError, load_clip_text, load_clip_vision
from ipadapter_jax.weights.files import read_safetensors
from tests import torch_reference as ref

IDS = torch.tensor(
  [
    [0, 5, 7, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [0, 50, 98, 3, 4, 60, 61, 62, 63, 64, 65, 66, 67, 68, 2, 1],
  ]
)


@pytest.mark.parametrize(
  "cls,eos,act",
  [
    (CLIPTextModel, 2, "quick_gelu"),
    (CLIPTextModel, 1, "quick_gelu"),
    (CLIPTextModelWithProjection, 1, "gelu"),
  ],
)
def test_text_parity(tmp_path, cls, eos, act):
  config = CLIPTextConfig(**dict(ref.TEXT_LIKE, eos_token_id=eos, hidden_act=act))
  torch_model = ref.randomize_(cls(config), seed=eos)
  torch_model.save_pretrained(tmp_path)
  model = load_clip_text(str(tmp_path))
  assert (model.text_projection is not None) == (cls is CLIPTextModelWithProjection)
  with torch.no_grad():
    expected = torch_model(IDS, output_hidden_states=True)
  out = model(jnp.asarray(IDS.numpy()))
  assert len(out.hidden_states) == len(expected.hidden_states) == 4
  errs = [
    ref.assert_close(out.last_hidden_state, expected.last_hidden_state.numpy()),
    ref.assert_close(out.hidden_states[-2], expected.hidden_states[-2].numpy()),
  ]
  if cls is CLIPTextModelWithProjection:
    errs.append(ref.assert_close(out.text_embeds, expected.text_embeds.numpy()))
  else:
    errs.append(ref.assert_close(out.pooled, expected.pooler_output.numpy()))
  print(f"{cls.__name__} eos={eos}: max abs errors {['%.1e' % e for e in errs]}")


def test_vision_parity(tmp_path):
  torch_model = ref.randomize_(
    CLIPVisionModelWithProjection(CLIPVisionConfig(**ref.VISION_LIKE)), 4
  )
  torch_model.save_pretrained(tmp_path)
  model = load_clip_vision(str(tmp_path))
  pixels = torch.randn(2, 3, 30, 30)
  with torch.no_grad():
    expected = torch_model(pixels, output_hidden_states=True)
  out = model(jnp.asarray(pixels.numpy()).transpose(0, 2, 3, 1))
  err_embeds = ref.assert_close(out.image_embeds, expected.image_embeds.numpy())
  err_plus = ref.assert_close(out.hidden_states[-2], expected.hidden_states[-2].numpy())
  print(f"vision: image_embeds {err_embeds:.1e}, hidden_states[-2] {err_plus:.1e}")
  nchw = model(jnp.asarray(pixels.numpy()), layout="NCHW")
  np.testing.assert_array_equal(np.asarray(nchw.image_embeds), np.asarray(out.image_embeds))


def test_both_text_key_forms_load(tmp_path):
  """transformers 5 writes a bare CLIPTextModel without `text_model.`; earlier files have it,
  and sometimes a position_ids buffer."""
  torch_model = ref.randomize_(CLIPTextModel(CLIPTextConfig(**ref.TEXT_LIKE)), 0)
  torch_model.save_pretrained(tmp_path / "v5")
  state = read_safetensors(str(tmp_path / "v5" / "model.safetensors"))
  assert not any(k.startswith("text_model.") for k in state)
  legacy = {"text_model." + k: torch.from_numpy(np.array(v)) for k, v in state.items()}
  legacy["text_model.embeddings.position_ids"] = torch.arange(16)[None]
  (tmp_path / "v4").mkdir()
  shutil.copy(tmp_path / "v5" / "config.json", tmp_path / "v4")
  from safetensors.torch import save_file

  save_file(legacy, str(tmp_path / "v4" / "model.safetensors"))
  a, b = load_clip_text(str(tmp_path / "v5")), load_clip_text(str(tmp_path / "v4"))
  ids = jnp.asarray(IDS.numpy())
  np.testing.assert_array_equal(np.asarray(a(ids).pooled), np.asarray(b(ids).pooled))


def test_full_clip_folder_as_image_encoder(tmp_path):
  config = CLIPConfig(text_config=ref.TEXT_LIKE, vision_config=ref.VISION_LIKE, projection_dim=24)
  torch_model = ref.randomize_(CLIPModel(config), 3)
  torch_model.save_pretrained(tmp_path)
  model = load_clip_vision(str(tmp_path))
  pixels = torch.randn(1, 3, 30, 30)
  with torch.no_grad():
    expected = torch_model.get_image_features(pixels)
  expected = getattr(expected, "pooler_output", expected)
  ref.assert_close(model(jnp.asarray(pixels.numpy()), layout="NCHW").image_embeds, expected.numpy())


def test_mismatched_config_names_file_and_key(tmp_path):
  ref.randomize_(CLIPTextModel(CLIPTextConfig(**ref.TEXT_LIKE)), 0).save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=40)))
  with pytest.raises(
    CheckpointError,
    match=r"model.safetensors: key 'text_model.encoder.layers.0"
    r".mlp.fc1.(weight|bias)' has shape",
  ):
    load_clip_text(str(tmp_path))
  del config["hidden_size"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"config.json: required key 'hidden_size' is missing"):
    load_clip_text(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_size=32, hidden_act="relu")))
  with pytest.raises(ValueError, match=r"config.json: 'hidden_act'='relu' is not supported"):
    load_clip_text(str(tmp_path))


def _count(ctor):
  model = nnx.eval_shape(ctor)
  return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_real_sizes_by_shape():
  text_l = clip.CLIPTextConfig.from_transformers(CLIP_L14_TEXT, with_projection=False)
  text_g = clip.CLIPTextConfig.from_transformers(OPENCLIP_BIGG14_TEXT, with_projection=True)
  vision_h = clip.CLIPVisionConfig.from_transformers(OPENCLIP_H14_VISION)
  assert _count(lambda: clip.CLIPTextModel(text_l, rngs=nnx.Rngs(0))) == 123_060_480
  assert _count(lambda: clip.CLIPTextModel(text_g, rngs=nnx.Rngs(0))) == 694_659_840
  assert (
    _count(lambda: clip.CLIPVisionModelWithProjection(vision_h, rngs=nnx.Rngs(0))) == 632_076_800
  )
