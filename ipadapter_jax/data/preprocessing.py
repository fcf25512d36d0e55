"""Images -> the pixel arrays the frozen encoders take.

CLIP pixels follow transformers' CLIPImageProcessor (PIL backend) step for step, driven by a
folder's preprocessor_config.json; VAE pixels follow the IP-Adapter training script
(torchvision Resize + CenterCrop + Normalize(0.5, 0.5)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

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

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "preprocessor config") -> "CLIPImageConfig":
    values = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
    if "size" in raw:
      values["size"] = _parse_size(raw["size"], "size", source, shortest_edge_ok=True)
    if "crop_size" in raw:
      values["crop_size"] = _parse_size(raw["crop_size"], "crop_size", source)
    for key in ("image_mean", "image_std"):
      if key in values:
        values[key] = tuple(values[key])
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    """A transformers `preprocessor_config.json` dict for these settings."""
    out = dataclasses.asdict(self)
    out["size"] = ({"shortest_edge": self.size} if isinstance(self.size, int) else
                   {"height": self.size[0], "width": self.size[1]})
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
  raise ValueError(f"{source}: '{key}'={value!r} is not supported "
                   "(an int, {'shortest_edge': n} or {'height': h, 'width': w})")


def to_pil(image) -> Image.Image:
  """A PIL image, or a uint8 [H, W] / [H, W, C] array, as a PIL image."""
  if isinstance(image, Image.Image):
    return image
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise ValueError(f"expected a PIL image or a uint8 [H, W(, C)] array, got {array.dtype} "
                     f"{array.shape}")
  return Image.fromarray(array)


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB, with any transparency composited onto white (as transformers does)."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)),
                                 rgba).convert("RGB")
  return image.convert("RGB")


def shortest_side_size(width: int, height: int, shortest: int) -> tuple[int, int]:
  """(width, height) with the short side `shortest` and the long side truncated, as transformers
  and torchvision compute it."""
  if width <= height:
    return shortest, int(shortest * height / width)
  return int(shortest * width / height), shortest


def _centre_crop_or_pad(array_HWC: np.ndarray, height: int, width: int) -> np.ndarray:
  """transformers' centre crop: offsets floor((in - out) / 2), zero padding when too small."""
  h, w = array_HWC.shape[:2]
  if h < height or w < width:
    padded = np.zeros((max(h, height), max(w, width)) + array_HWC.shape[2:], array_HWC.dtype)
    top, left = math.ceil((padded.shape[0] - h) / 2), math.ceil((padded.shape[1] - w) / 2)
    padded[top:top + h, left:left + w] = array_HWC
    array_HWC = padded
  top, left = (array_HWC.shape[0] - height) // 2, (array_HWC.shape[1] - width) // 2
  return array_HWC[top:top + height, left:left + width]


def clip_pixels(images: Sequence, config: CLIPImageConfig = CLIPImageConfig()) -> np.ndarray:
  """PIL images of any size and mode -> CLIP pixel values [B, H, W, 3] float32 (NHWC)."""
  return np.stack([_clip_one(to_pil(image), config) for image in images])


def _clip_one(image: Image.Image, cfg: CLIPImageConfig) -> np.ndarray:
  image = to_rgb(image) if cfg.do_convert_rgb else image
  if cfg.do_resize:
    if isinstance(cfg.size, int):
      size = shortest_side_size(image.width, image.height, cfg.size)
    else:
      size = (cfg.size[1], cfg.size[0])
    image = image.resize(size, resample=Image.Resampling(cfg.resample))
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[:, :, None]
  if cfg.do_center_crop:
    array = _centre_crop_or_pad(array, *cfg.crop_size)
  if cfg.do_rescale:  # float64 product, then float32, as transformers does
    array = (array.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
  if cfg.do_normalize:
    array = array.astype(np.float32) if not np.issubdtype(array.dtype, np.floating) else array
    mean = np.asarray(cfg.image_mean, array.dtype)
    std = np.asarray(cfg.image_std, array.dtype)
    array = (array - mean) / std
  return array.astype(np.float32)


def vae_pixels(image, resolution: int) -> np.ndarray:
  """An image -> [resolution, resolution, 3] float32 in [-1, 1] for the VAE encoder.

  Shortest side resized to `resolution` (bilinear), centre crop with torchvision's rounding.
  """
  image = to_rgb(to_pil(image))
  image = image.resize(shortest_side_size(image.width, image.height, resolution),
                       resample=Image.Resampling.BILINEAR)
  top = int(round((image.height - resolution) / 2.0))
  left = int(round((image.width - resolution) / 2.0))
  array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.float32)
  return (array / 255.0 - 0.5) / 0.5
