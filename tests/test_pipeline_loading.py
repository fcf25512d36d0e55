"""Opening whole Stable Diffusion folders (made here with diffusers' save_pretrained)."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
  AutoencoderKL,
  DDIMScheduler,
  StableDiffusionPipeline,
  StableDiffusionXLPipeline,
)
from flax import nnx
from transformers import (
  CLIPImageProcessor,
  CLIPTextConfig,
  CLIPTextModel,
  CLIPTextModelWithProjection,
  CLIPTokenizer,
  CLIPVisionConfig,
  CLIPVisionModelWithProjection,
)

from ipadapter_jax.models import AdapterConfig
from ipadapter_jax.preprocessing import CLIPImageConfig
from ipadapter_jax.tokenizer import tokenize, write_word_tokenizer
from ipadapter_jax.weights import CheckpointError, load_stable_diffusion
from tests import torch_reference as ref


def _tokenizer(tmp_path):
  write_word_tokenizer(str(tmp_path / "words"), ref.WORDS, model_max_length=16)
  return CLIPTokenizer.from_pretrained(str(tmp_path / "words"))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sd")
  pipe = StableDiffusionPipeline(
    vae=ref.randomize_(AutoencoderKL(**ref.VAE_LIKE), 0),
    text_encoder=ref.randomize_(CLIPTextModel(CLIPTextConfig(**ref.TEXT_LIKE)), 1),
    tokenizer=_tokenizer(tmp),
    unet=ref.tiny_unet(ref.SD15_LIKE, 2),
    scheduler=DDIMScheduler(),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipe.save_pretrained(tmp / "pipeline")
  encoder = ref.randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**ref.VISION_LIKE)), 3)
  encoder.save_pretrained(tmp / "image_encoder")
  CLIPImageProcessor(
    size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
  ).save_pretrained(tmp / "image_encoder")
  return tmp, pipe, encoder


def test_loads_every_component(sd_folder):
  tmp, pipe, encoder = sd_folder
  sd = load_stable_diffusion(
    str(tmp / "pipeline"), image_encoder=str(tmp / "image_encoder"), adapter=AdapterConfig(4, 24)
  )
  assert not sd.is_sdxl and sd.unet.image_proj is not None
  assert sd.scheduler_config["_class_name"] == "DDIMScheduler"
  assert sd.image_processor == CLIPImageConfig(size=30, crop_size=(30, 30))
  ids = tokenize(sd.tokenizer, ["a red circle"])
  expected_ids = pipe.tokenizer(
    ["a red circle"], padding="max_length", max_length=16, return_tensors="np"
  ).input_ids
  np.testing.assert_array_equal(ids, expected_ids)
  with torch.no_grad():
    expected = pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  ref.assert_close(sd.text_encoder(jnp.asarray(ids)).last_hidden_state, expected)
  pixels = torch.randn(1, 3, 30, 30)
  with torch.no_grad():
    expected = encoder(pixels).image_embeds.numpy()
  ref.assert_close(
    sd.image_encoder(jnp.asarray(pixels.numpy()), layout="NCHW").image_embeds, expected
  )


def test_weights_cast_to_bfloat16(sd_folder):
  tmp, _, _ = sd_folder
  sd = load_stable_diffusion(str(tmp / "pipeline"), param_dtype=jnp.bfloat16)
  for model in (sd.unet, sd.vae, sd.text_encoder):
    assert {v.dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))} == {
      jnp.dtype(jnp.bfloat16)
    }


def test_missing_component_is_named(sd_folder, tmp_path):
  tmp, _, _ = sd_folder
  shutil.copytree(tmp / "pipeline", tmp_path / "p")
  shutil.rmtree(tmp_path / "p" / "vae")
  with pytest.raises(CheckpointError, match=r"model_index.json lists 'vae' but the folder"):
    load_stable_diffusion(str(tmp_path / "p"))
  index = json.loads((tmp_path / "p" / "model_index.json").read_text())
  del index["unet"]
  (tmp_path / "p" / "model_index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=r"model_index.json: required component 'unet'"):
    load_stable_diffusion(str(tmp_path / "p"))


def test_mismatched_unet_config_names_file_and_key(sd_folder, tmp_path):
  tmp, _, _ = sd_folder
  shutil.copytree(tmp / "pipeline", tmp_path / "p")
  config_path = tmp_path / "p" / "unet" / "config.json"
  config = json.loads(config_path.read_text())
  config["cross_attention_dim"] = 40
  config_path.write_text(json.dumps(config))
  with pytest.raises(
    CheckpointError,
    match=r"unet/diffusion_pytorch_model.safetensors: key "
    r"'down_blocks.0.attentions.0.transformer_blocks.0"
    r".attn2.to_k.weight' has shape \[32, 32\]",
  ):
    load_stable_diffusion(str(tmp_path / "p"))
  config_path.write_text(
    json.dumps(dict(config, cross_attention_dim=32, dual_cross_attention=True))
  )
  with pytest.raises(ValueError, match=r"unet/config.json: 'dual_cross_attention'=True"):
    load_stable_diffusion(str(tmp_path / "p"))


def test_sdxl_folder(tmp_path):
  text_2 = CLIPTextConfig(
    **dict(ref.TEXT_LIKE, hidden_size=8, num_attention_heads=2, projection_dim=ref.SDXL_POOLED_DIM)
  )
  unet_config = dict(ref.SDXL_LIKE, cross_attention_dim=40)
  pipe = StableDiffusionXLPipeline(
    vae=ref.randomize_(AutoencoderKL(**ref.VAE_LIKE), 0),
    text_encoder=ref.randomize_(CLIPTextModel(CLIPTextConfig(**ref.TEXT_LIKE)), 1),
    text_encoder_2=ref.randomize_(CLIPTextModelWithProjection(text_2), 2),
    tokenizer=_tokenizer(tmp_path),
    tokenizer_2=_tokenizer(tmp_path),
    unet=ref.tiny_unet(unet_config, 3),
    scheduler=DDIMScheduler(),
  )
  pipe.save_pretrained(tmp_path / "xl")
  sd = load_stable_diffusion(str(tmp_path / "xl"))
  assert sd.is_sdxl and sd.text_encoder_2.text_projection is not None
  ids = jnp.asarray(tokenize(sd.tokenizer_2, ["a blue square"]))
  with torch.no_grad():
    expected = pipe.text_encoder_2(torch.from_numpy(np.array(ids)).long()).text_embeds.numpy()
  ref.assert_close(sd.text_encoder_2(ids).text_embeds, expected)


def test_unknown_path_is_reported():
  with pytest.raises(CheckpointError, match="no such folder, and not a hub id"):
    load_stable_diffusion("/nonexistent-folder")
