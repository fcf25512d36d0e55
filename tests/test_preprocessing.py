"""Pixels and token ids: equal to what transformers' CLIPImageProcessor (reading the folder
itself) and CLIPTokenizer give, and to an independent computation of the pixels."""

import json

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ipadapter_jax.preprocessing import (CLIPImageConfig, _processor, clip_pixels,
                                              vae_pixels)
from ipadapter_jax.tokenizer import load_tokenizer, tokenize, write_word_tokenizer
from tests import torch_reference as ref


def _images():
  rng = np.random.default_rng(0)
  noise = lambda h, w, c: rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)
  palette = Image.fromarray(noise(41, 37, 0)).convert("P")
  palette.info["transparency"] = 0
  return {
      "square": Image.fromarray(noise(300, 300, 3)),
      "wide": Image.fromarray(noise(180, 517, 3)),
      "tall": Image.fromarray(noise(640, 229, 3)),
      "rgba": Image.fromarray(noise(250, 311, 4), "RGBA"),
      "grey": Image.fromarray(noise(97, 130, 0), "L"),
      "small": Image.fromarray(noise(20, 33, 3)),
      "palette_with_transparency": palette,
  }


@pytest.mark.parametrize("settings", [{}, {"size": {"shortest_edge": 30},
                                            "crop_size": {"height": 30, "width": 30}},
                                      {"size": 64, "crop_size": 48, "resample": 2}])
def test_clip_pixels_equal_transformers(tmp_path, settings):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"image_processor_type": "CLIPImageProcessor", **settings}))
  theirs = CLIPImageProcessorPil.from_pretrained(tmp_path)  # its own reading of the file
  ours = CLIPImageConfig.from_folder(str(tmp_path))
  for name, image in _images().items():
    expected = theirs(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    actual = clip_pixels([image], ours)[0]
    assert actual.shape == expected.shape, name
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("settings", [
    {"size": {"shortest_edge": 30}, "crop_size": {"height": 26, "width": 21}, "resample": 2,
     "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4]},
    {"size": {"height": 20, "width": 25}, "do_center_crop": False, "do_normalize": False},
])
def test_clip_pixels_equal_an_independent_computation(tmp_path, settings):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
  config = CLIPImageConfig.from_folder(str(tmp_path))
  for name in ("wide", "tall", "rgba"):
    image = _images()[name]
    if "shortest_edge" in settings["size"]:  # the short side to 30, the long one truncated
      short = settings["size"]["shortest_edge"]
      scale = short / min(image.size)
      size = tuple(short if side == min(image.size) else int(side * scale) for side in image.size)
    else:
      size = (settings["size"]["width"], settings["size"]["height"])
    rgb = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    expected = np.asarray(rgb.convert("RGB").resize(size, settings.get("resample", 3)),
                          np.float64) / 255
    if "crop_size" in settings:
      h, w = settings["crop_size"]["height"], settings["crop_size"]["width"]
      top, left = (expected.shape[0] - h) // 2, (expected.shape[1] - w) // 2
      expected = expected[top:top + h, left:left + w]
    if settings.get("do_normalize", True):
      expected = (expected - settings["image_mean"]) / np.asarray(settings["image_std"])
    actual = clip_pixels([image], config)[0]
    assert actual.dtype == np.float32 and actual.shape == expected.shape, name
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0, err_msg=name)


def test_processor_built_once_per_config():
  listed = CLIPImageConfig.from_dict({"image_mean": [0.5, 0.5, 0.5], "crop_size": 30, "size": 30})
  assert listed == CLIPImageConfig(size=30, crop_size=(30, 30), image_mean=(0.5, 0.5, 0.5))
  assert _processor(listed) is _processor(CLIPImageConfig.from_dict(listed.to_dict()))
  assert _processor(listed) is not _processor(CLIPImageConfig())


def test_defaults_without_a_preprocessor_config(tmp_path):
  assert CLIPImageConfig.from_folder(str(tmp_path)) == CLIPImageConfig()
  assert clip_pixels([np.zeros((10, 20, 3), np.uint8)]).shape == (1, 224, 224, 3)


def test_unsupported_size_is_named():
  with pytest.raises(ValueError, match="'size'"):
    CLIPImageConfig.from_dict({"size": {"shortest_edge": 224, "longest_edge": 300}})


def test_vae_pixels_resize_shortest_side_and_centre_crop():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 40:] = 255  # black left half, white right half: the centre crop straddles the edge
  out = vae_pixels(Image.fromarray(image), 20)
  assert out.shape == (20, 20, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, :9], -1.0)
  np.testing.assert_array_equal(out[:, 11:], 1.0)


def test_token_ids_equal_clip_tokenizer(tmp_path):
  write_word_tokenizer(str(tmp_path), ref.WORDS, model_max_length=12)
  ours = load_tokenizer(str(tmp_path))
  theirs = CLIPTokenizer.from_pretrained(str(tmp_path))
  prompts = ["a red circle", "A photo of a BLUE square on a green background, again and again",
             "", "unknown words spell out"]
  expected = theirs(prompts, padding="max_length", max_length=12, truncation=True).input_ids
  np.testing.assert_array_equal(tokenize(ours, prompts), np.asarray(expected))
  ids = tokenize(ours, "a red circle")[0]
  assert ids[0] == ours.bos_token_id and list(ids[1:4]) == ours.convert_tokens_to_ids(
      ["a</w>", "red</w>", "circle</w>"]) and ids[4] == ours.eos_token_id


def test_missing_tokenizer_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    load_tokenizer(str(tmp_path))
