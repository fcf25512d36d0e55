"""Pixels and token ids: equal to what transformers' CLIPImageProcessor (reading the folder
itself) and CLIPTokenizer give, and to an independent computation of the pixels."""

import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ipadapter_jax import evaluate
from ipadapter_jax.generation.image_prompts import open_image
from ipadapter_jax.preprocessing import (
  CLIPImageConfig,
  ImageFileError,
  _processor,
  clip_pixels,
  load_image,
  vae_pixels,
)
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


@pytest.mark.parametrize(
  "settings",
  [
    {},
    {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}},
    {"size": 64, "crop_size": 48, "resample": 2},
  ],
)
def test_clip_pixels_equal_transformers(tmp_path, settings):
  (tmp_path / "preprocessor_config.json").write_text(
    json.dumps({"image_processor_type": "CLIPImageProcessor", **settings})
  )
  theirs = CLIPImageProcessorPil.from_pretrained(tmp_path)  # its own reading of the file
  ours = CLIPImageConfig.from_folder(str(tmp_path))
  for name, image in _images().items():
    expected = theirs(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    actual = clip_pixels([image], ours)[0]
    assert actual.shape == expected.shape, name
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize(
  "settings",
  [
    {
      "size": {"shortest_edge": 30},
      "crop_size": {"height": 26, "width": 21},
      "resample": 2,
      "image_mean": [0.5, 0.4, 0.3],
      "image_std": [0.2, 0.3, 0.4],
    },
    {"size": {"height": 20, "width": 25}, "do_center_crop": False, "do_normalize": False},
  ],
)
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
    expected = (
      np.asarray(rgb.convert("RGB").resize(size, settings.get("resample", 3)), np.float64) / 255
    )
    if "crop_size" in settings:
      h, w = settings["crop_size"]["height"], settings["crop_size"]["width"]
      top, left = (expected.shape[0] - h) // 2, (expected.shape[1] - w) // 2
      expected = expected[top : top + h, left : left + w]
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
  prompts = [
    "a red circle",
    "A photo of a BLUE square on a green background, again and again",
    "",
    "unknown words spell out",
  ]
  expected = theirs(prompts, padding="max_length", max_length=12, truncation=True).input_ids
  np.testing.assert_array_equal(tokenize(ours, prompts), np.asarray(expected))
  ids = tokenize(ours, "a red circle")[0]
  assert (
    ids[0] == ours.bos_token_id
    and list(ids[1:4]) == ours.convert_tokens_to_ids(["a</w>", "red</w>", "circle</w>"])
    and ids[4] == ours.eos_token_id
  )


def test_missing_tokenizer_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Image files


def _png_header(path, width: int, height: int):
  """A PNG that declares width x height and holds no pixel data: PIL checks the size on open."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (
      struct.pack(">I", len(data))
      + kind
      + data
      + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )

  path.write_bytes(
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    + chunk(b"IEND", b"")
  )


def _assert_one_line_naming(error, name: str, *parts: str):
  message = str(error.value)
  assert message.startswith(f"{name}: not a readable image (") and "\n" not in message, message
  for part in parts:
    assert part in message, message


def _readers(path):
  """Every way an image file is read for sampling and evaluation, with the name it must give."""
  annotations = path.parent / "eval.json"
  annotations.write_text(json.dumps([{"image_file": path.name, "text": ""}]))
  return [
    (lambda: load_image(str(path)), str(path)),
    (lambda: open_image(str(path), "--image"), f"--image {path}"),
    (lambda: evaluate.load_annotated_images(str(annotations)), str(path)),
  ]


def test_decompression_bombs_are_one_line_errors(tmp_path, monkeypatch):
  """Bugs: PIL's DecompressionBombError as a traceback; an image over the limit but under twice
  it (PIL only warns) read anyway, its warning printed."""
  _png_header(tmp_path / "bomb.png", 30000, 30000)  # over twice PIL's limit: PIL raises
  for read, name in _readers(tmp_path / "bomb.png"):
    with pytest.raises(ImageFileError) as error:
      read()
    _assert_one_line_naming(error, name, "decompression bomb", "900000000 pixels")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a real image between 1x and 2x it
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
  for read, name in _readers(tmp_path / "big.png"):
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # PIL's warning must not be shown either
      with pytest.raises(ImageFileError) as error:
        read()
    _assert_one_line_naming(error, name, "decompression bomb", "40x40 = 1600 pixels", "1000")


def test_truncated_and_corrupt_images_are_one_line_errors(tmp_path):
  """Bugs: a file opened lazily (as diffusers' load_image does), so that its truncation surfaces
  later as a traceback; PIL's own message, which names a BytesIO object instead of the file."""
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "cut.png")
  data = (tmp_path / "cut.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
  (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + rng.bytes(500))
  for read, name in _readers(tmp_path / "cut.png"):
    with pytest.raises(ImageFileError) as error:
      read()
    _assert_one_line_naming(error, name, "truncated or corrupt")
  for read, name in _readers(tmp_path / "garbage.jpg"):
    with pytest.raises(ImageFileError) as error:
      read()
    _assert_one_line_naming(error, name, "not an image format PIL knows")
    assert "BytesIO" not in str(error.value)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_as_diffusers_load_image(tmp_path, orientation):
  """Bug: the EXIF orientation tag ignored (a phone photo read sideways)."""
  from diffusers.utils import load_image as diffusers_load_image

  rng = np.random.default_rng(orientation)
  exif = Image.Exif()
  exif[0x0112] = orientation
  path = tmp_path / "photo.jpg"
  Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(path, exif=exif)
  expected = np.asarray(diffusers_load_image(str(path)))
  with Image.open(path) as raw:
    assert not np.array_equal(np.asarray(raw.convert("RGB")), expected)  # the tag matters
  for read, _ in _readers(path):
    image = read()
    image = image[0][0] if isinstance(image, tuple) else image
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), expected)
  grey = tmp_path / "grey.png"  # mode=None keeps the file's mode (T2I-Adapter sketches)
  Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)).save(grey)
  assert open_image(str(grey), "--adapter_image", mode=None).mode == "L"
