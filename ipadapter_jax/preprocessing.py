"""Images <-> pixel arrays: what the frozen encoders and the T2I-Adapter take, and the sampled
images back as PIL images and grids; image files read with one-line errors.

Every image file is decoded by `decode_image_file`: one that is not an image, truncated, corrupt
or a decompression bomb (over PIL's `Image.MAX_IMAGE_PIXELS`) is an `ImageFileError` naming it.
`load_image` reads a file as diffusers' `load_image` does (EXIF orientation applied, then RGB).

CLIP pixels come from transformers' CLIPImageProcessorPil (the PIL backend that
CLIPImageProcessor uses without torchvision), built once per CLIPImageConfig, which holds a
folder's preprocessor_config.json. A step-by-step numpy copy measured only about 20% faster on
2 CPU cores (4.2 vs 5.0 ms for a 640x480 JPEG, next to 6.1 ms of decoding and VAE pixels), too
little to keep a second implementation. VAE pixels follow the IP-Adapter training script
(torchvision Resize + CenterCrop + Normalize(0.5, 0.5)).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import re
import struct
import warnings
import zlib
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPImageConfig:
  """CLIPImageProcessor settings. `size` is the shortest edge, or (height, width) when exact."""

  size: int | tuple[int, int] = 224
  crop_size: tuple[int, int] = (224, 224)
  resample: int = 3  # PIL bicubic
  do_convert_rgb: bool = True
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = OPENAI_CLIP_STD

  def __post_init__(self):  # tuples, not lists, so that a config is hashable (see _processor)
    for name in ("size", "crop_size", "image_mean", "image_std"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "preprocessor config") -> "CLIPImageConfig":
    values = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
    if "size" in raw:
      values["size"] = _parse_size(raw["size"], "size", source, shortest_edge_ok=True)
    if "crop_size" in raw:
      values["crop_size"] = _parse_size(raw["crop_size"], "crop_size", source)
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    """A transformers `preprocessor_config.json` dict for these settings."""
    out = dataclasses.asdict(self)
    out["size"] = (
      {"shortest_edge": self.size}
      if isinstance(self.size, int)
      else {"height": self.size[0], "width": self.size[1]}
    )
    out["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
    return {"image_processor_type": "CLIPImageProcessor", **out}

  @classmethod
  def from_folder(cls, folder: str) -> "CLIPImageConfig":
    """The folder's preprocessor_config.json, or CLIP's defaults when it has none."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
      return cls()
    with open(path) as f:
      return cls.from_dict(json.load(f), source=path)


def _parse_size(value, key: str, source: str, shortest_edge_ok: bool = False):
  if isinstance(value, int):
    return value if shortest_edge_ok else (value, value)
  if isinstance(value, dict):
    if set(value) == {"shortest_edge"} and shortest_edge_ok:
      return int(value["shortest_edge"])
    if set(value) == {"height", "width"}:
      return (int(value["height"]), int(value["width"]))
  raise ValueError(
    f"{source}: '{key}'={value!r} is not supported "
    "(an int, {'shortest_edge': n} or {'height': h, 'width': w})"
  )


# What PIL raises for files that are not images, or are truncated or corrupt.
IMAGE_ERRORS = (
  OSError,
  SyntaxError,
  ValueError,
  EOFError,
  struct.error,
  zlib.error,
  Image.DecompressionBombError,
)


class ImageFileError(ValueError):
  """An image file that is missing, not an image, truncated or corrupt, or a decompression bomb
  (`kind`: "missing", "unreadable", "corrupt", "decompression bomb"; `detail`: why)."""

  def __init__(self, name: str, kind: str, detail: str):
    lead = {"corrupt": "truncated or corrupt: ", "decompression bomb": "a decompression bomb: "}
    super().__init__(f"{name}: not a readable image ({lead.get(kind, '')}{detail})")
    self.name, self.kind, self.detail = name, kind, detail

  def __reduce__(self):  # crosses from grain's worker processes intact
    return type(self), (self.name, self.kind, self.detail)


def _bomb(name: str, pixels: str) -> ImageFileError:
  return ImageFileError(
    name,
    "decompression bomb",
    f"{pixels} pixels, over PIL's Image.MAX_IMAGE_PIXELS limit of {Image.MAX_IMAGE_PIXELS}",
  )


def _error_text(error: Exception) -> str:
  """ "OSError: reason" on one line."""
  return f"{type(error).__name__}: {' '.join(str(error).split())}".rstrip(": ")


def decode_image_file(file, name: str) -> Image.Image:
  """A path or encoded bytes -> the whole image decoded, or one ImageFileError line naming it.

  Images over PIL's limit are refused before decoding (PIL itself only warns up to twice the
  limit). The warnings filters are left alone, so this is safe in threads; PIL's warning for
  such an image may then still be printed (`load_image` silences it).
  """
  if isinstance(file, (bytes, bytearray, memoryview, np.bytes_)):
    data = bytes(file)
  else:
    try:
      with open(file, "rb") as f:  # read whole: no file handle outlives a failed decode
        data = f.read()
    except FileNotFoundError:
      raise ImageFileError(name, "missing", "no such file") from None
    except OSError as e:
      raise ImageFileError(name, "unreadable", str(e.strerror or e)) from None
  try:
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
      raise _bomb(name, f"{width}x{height} = {width * height}")
    image.load()
  except ImageFileError:
    raise
  except Image.UnidentifiedImageError:
    raise ImageFileError(name, "unreadable", "not an image format PIL knows") from None
  except Image.DecompressionBombError as e:  # PIL's own refusal, at twice its limit
    pixels = re.search(r"\((\d+) pixels\)", str(e))
    raise _bomb(name, pixels.group(1) if pixels else "too many") from None
  except IMAGE_ERRORS as e:
    raise ImageFileError(name, "corrupt", _error_text(e)) from None
  return image


def load_image(path: str, name: str | None = None, mode: str | None = "RGB") -> Image.Image:
  """An image file as diffusers.utils.load_image reads it: EXIF orientation applied, then
  converted to `mode` (None keeps the file's mode). `name` (default: the path) leads errors."""
  name = path if name is None else name
  with warnings.catch_warnings():  # refused in one line instead; not for threads (see above)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    image = decode_image_file(path, name)
  try:
    image = ImageOps.exif_transpose(image)
  except IMAGE_ERRORS as e:
    raise ImageFileError(name, "corrupt", f"EXIF data: {_error_text(e)}") from None
  return image if mode is None else image.convert(mode)


def to_pil(image) -> Image.Image:
  """A PIL image, or a uint8 [H, W] / [H, W, C] array, as a PIL image."""
  if isinstance(image, Image.Image):
    return image
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise ValueError(
      f"expected a PIL image or a uint8 [H, W(, C)] array, got {array.dtype} {array.shape}"
    )
  return Image.fromarray(array)


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB, with any transparency composited onto white (as transformers does)."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert(
      "RGB"
    )
  return image.convert("RGB")


def shortest_side_size(width: int, height: int, shortest: int) -> tuple[int, int]:
  """(width, height) with the short side `shortest` and the long side truncated, as transformers
  and torchvision compute it."""
  if width <= height:
    return shortest, int(shortest * height / width)
  return int(shortest * width / height), shortest


def clip_pixels(images: Sequence, config: CLIPImageConfig = CLIPImageConfig()) -> np.ndarray:
  """PIL images of any size and mode -> CLIP pixel values [B, H, W, 3] float32 (NHWC)."""
  pixels_BCHW = _processor(config)([to_pil(image) for image in images], return_tensors="np")[
    "pixel_values"
  ]
  return np.ascontiguousarray(pixels_BCHW.transpose(0, 2, 3, 1), dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _processor(config: CLIPImageConfig) -> "CLIPImageProcessorPil":
  """The processor for `config`, built once per config (and per grain worker process)."""
  # Imported here: where torch is installed, transformers' image processing imports it too.
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # pylint: disable=import-outside-toplevel

  settings = config.to_dict()
  del settings["image_processor_type"]
  return CLIPImageProcessorPil(**settings)


def vae_pixels(image, resolution: int) -> np.ndarray:
  """An image -> [resolution, resolution, 3] float32 in [-1, 1] for the VAE encoder.

  Shortest side resized to `resolution` (bilinear), centre crop with torchvision's rounding.
  """
  image = to_rgb(to_pil(image))
  image = image.resize(
    shortest_side_size(image.width, image.height, resolution), resample=Image.Resampling.BILINEAR
  )
  top = int(round((image.height - resolution) / 2.0))
  left = int(round((image.width - resolution) / 2.0))
  array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.float32)
  return (array / 255.0 - 0.5) / 0.5


_ADAPTER_IMAGE_MODES = ("RGB", "L", "RGBA")


def preprocess_adapter_image(image, height: int, width: int) -> np.ndarray:
  """A control image as the adapter reads it: [height, width, C] float32 in [0, 1].

  As diffusers' StableDiffusionXLAdapterPipeline: a LANCZOS resize to height x width, then /255,
  no normalisation, channels as the image has them (1 for "L"). `image` is a PIL image or a
  uint8 array [H, W] or [H, W, C].
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(
        f"preprocess_adapter_image: expected a uint8 array [H, W] or [H, W, C], "
        f"got {image.dtype} {list(image.shape)}"
      )
    image = Image.fromarray(image)
  if not isinstance(image, Image.Image):
    raise ValueError(
      f"preprocess_adapter_image: expected a PIL image or a uint8 array, got {type(image).__name__}"
    )
  if image.mode not in _ADAPTER_IMAGE_MODES:
    raise ValueError(
      f"preprocess_adapter_image: image mode {image.mode!r} is not supported "
      f"({', '.join(_ADAPTER_IMAGE_MODES)}); convert it first, e.g. image.convert('RGB')"
    )
  pixels = np.asarray(image.resize((width, height), resample=Image.Resampling.LANCZOS))
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  return pixels.astype(np.float32) / 255.0


def image_grid(images: np.ndarray, cols: int | None = None) -> Image.Image:
  """[N, H, W, 3] in [0, 1] -> one PIL image, row by row with `cols` columns (default: as
  square as N allows)."""
  n, h, w, _ = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * h, cols * w, 3), np.uint8)
  for i, image in enumerate((images * 255).round().astype(np.uint8)):
    r, c = divmod(i, cols)
    grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
  return Image.fromarray(grid)
