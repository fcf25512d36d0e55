"""What each adapter is given for a generation, checked and turned into traced arrays.

`AdapterPrompt` is one adapter's share of a request: its images (or their saved embeddings),
scale, per-image weights and masks, timestep window and negative image. `adapter_inputs` turns
a list of them (one per loaded adapter, in load order) into the static `AdapterPlan`s a compiled
program is specialised to and the `AdapterInputs` it reads, so changing any value keeps the
program.
`save_image_embeds` / `load_image_embeds` keep encoded images in a .safetensors file whose
tensors are exactly diffusers' `ip_adapter_image_embeds` (negative first) for one prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from flax import struct
from PIL import Image

from ipadapter_jax.generation import adapter_scales
from ipadapter_jax.generation import masks as mask_ops
from ipadapter_jax.preprocessing import CLIPImageConfig, clip_pixels, load_image, to_pil
from ipadapter_jax.storage import atomic_path

EMBEDS_KEY = "ip_adapter_image_embeds.{}"


@dataclasses.dataclass
class AdapterPrompt:
  """One adapter's image prompt.

  images: the adapter's images (PIL images or arrays); their tokens are concatenated.
  embeds: instead of images, saved features [2, I, ...] (negative, positive) from
    `load_image_embeds`; no image encoder is needed then.
  scale: a float, one value per decoupled layer, a block dictionary or a preset name
    (`ipadapter_jax.generation.adapter_scales`).
  weights: one per image. Unmasked, a weight multiplies the image's tokens' unnormalised
    attention weights (0 removes the image, 1 is diffusers); masked, it multiplies the image's
    output, like diffusers' per-image scale list.
  masks: one per image (PIL images of any size): where each image's attention output lands.
  window: (start, end) fractions of the sampling steps; step i of S uses the image prompt when
    start <= i / S < end.
  negative_image: replaces the unconditional image in the guidance's negative branch.
  """

  images: Sequence[Any] = ()
  embeds: np.ndarray | None = None
  scale: Any = 1.0
  weights: Sequence[float] | None = None
  masks: Sequence[Any] | None = None
  window: tuple[float, float] = (0.0, 1.0)
  negative_image: Any = None

  @property
  def num_images(self) -> int:
    return len(self.images) if self.embeds is None else int(np.shape(self.embeds)[1])


@dataclasses.dataclass(frozen=True)
class AdapterPlan:
  """The static part of one adapter's prompt: what a compiled program is specialised to."""

  image_features: str  # what the adapter reads (AdapterConfig.image_features)
  num_images: int
  masked: bool
  weighted: bool
  precomputed: bool  # saved embeddings instead of pixels
  negative_image: bool


@struct.dataclass
class AdapterInputs:
  """The traced part of one adapter's prompt (I images, L decoupled layers, S steps)."""

  scale: np.ndarray  # [L] per decoupled layer
  window: np.ndarray  # [S] 1 where the image prompt acts
  pixels: np.ndarray | None = None  # [R or 1, I, h, w, 3] CLIP pixels
  embeds: np.ndarray | None = None  # [2, I, ...] saved (negative, positive) features
  negative_pixels: np.ndarray | None = None  # [1, h, w, 3] the negative image's CLIP pixels
  weights: np.ndarray | None = None  # [I] per-image weights
  masks: tuple[np.ndarray, ...] | None = None  # per layer [1, T, I]


def window_table(window, num_steps: int, where: str = "window") -> np.ndarray:
  """[num_steps] float32 of 1 where the image prompt acts (start <= i / S < end), else 0."""
  try:
    start, end = (float(v) for v in window)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: expected two numbers START,END, got {window!r}") from None
  if not (0.0 <= start < end <= 1.0):
    raise ValueError(f"{where} {start},{end}: needs 0 <= start < end <= 1")
  fractions = np.arange(num_steps) / num_steps
  return ((fractions >= start) & (fractions < end)).astype(np.float32)


def _pil(image, where: str):
  try:
    return to_pil(image)
  except Exception as e:  # noqa: BLE001 - any unreadable input gets the same one-line message
    raise ValueError(f"{where}: not a usable image ({e})") from None


def _check_embeds(embeds, kind: str, index: int, expected_tail) -> np.ndarray:
  embeds = np.asarray(embeds, np.float32)
  ndim = 3 if kind == "image_embeds" else 4
  if embeds.ndim != ndim or embeds.shape[0] != 2 or embeds.shape[1] < 1:
    raise ValueError(
      f"adapter {index}: saved embeddings have shape {list(embeds.shape)}, "
      f"expected [2 (negative, positive), images, ...] with {ndim} dimensions "
      f"for an adapter reading {kind}"
    )
  if expected_tail is not None and tuple(embeds.shape[2:]) != tuple(expected_tail):
    raise ValueError(
      f"adapter {index}: saved embeddings have features of shape "
      f"{list(embeds.shape[2:])}, this adapter reads {list(expected_tail)}"
    )
  return embeds


def adapter_inputs(
  prompts: Sequence[AdapterPrompt],
  adapters: Sequence,
  *,
  layer_names,
  queries,
  num_steps: int,
  height: int,
  width: int,
  processor: CLIPImageConfig | None,
  has_encoder: bool,
  feature_shapes: dict | None = None,
):
  """(plans, inputs): one `AdapterPlan` and one `AdapterInputs` per adapter.

  `adapters` are the loaded adapters (each with `adapter_config`), `layer_names` and `queries`
  the UNet's cross-attention names and query counts at this size, `feature_shapes` the image
  encoder's {kind: feature shape} when one is loaded.
  """
  if len(prompts) != len(adapters):
    raise ValueError(
      f"{len(prompts)} adapter prompts for {len(adapters)} loaded adapters: "
      "give one per adapter, in load order"
    )
  processor = processor or CLIPImageConfig()
  plans, inputs = [], []
  for a, (prompt, adapter) in enumerate(zip(prompts, adapters)):
    kind = adapter.adapter_config.image_features
    where = f"adapter {a}"
    x: dict[str, Any] = {
      "scale": adapter_scales.expand_scale(prompt.scale, layer_names),
      "window": window_table(prompt.window, num_steps, f"{where}: window"),
    }
    if prompt.embeds is not None:
      if len(prompt.images):
        raise ValueError(f"{where}: give images or saved embeddings, not both")
      x["embeds"] = _check_embeds(prompt.embeds, kind, a, (feature_shapes or {}).get(kind))
    else:
      if not len(prompt.images):
        raise ValueError(f"{where}: no images (give at least one, or saved embeddings)")
      if not has_encoder:
        raise ValueError(f"{where}: images need a CLIP image encoder (image_encoder=...)")
      pil = [_pil(image, f"{where}: image {i}") for i, image in enumerate(prompt.images)]
      x["pixels"] = np.asarray(clip_pixels(pil, processor))[None]  # [1, I, h, w, c]
    count = prompt.num_images
    if prompt.negative_image is not None:
      if prompt.embeds is not None:
        raise ValueError(f"{where}: saved embeddings already hold the negative image")
      if not has_encoder:
        raise ValueError(f"{where}: a negative image needs a CLIP image encoder")
      x["negative_pixels"] = np.asarray(
        clip_pixels([_pil(prompt.negative_image, f"{where}: negative image")], processor)
      )
    if prompt.weights is not None:
      weights = np.asarray(prompt.weights, np.float32)
      if weights.shape != (count,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(
          f"{where}: {count} images need {count} finite weights >= 0, got "
          f"{list(np.atleast_1d(weights))}"
        )
      x["weights"] = weights
    if prompt.masks is not None:
      if len(prompt.masks) != count:
        raise ValueError(
          f"{where}: {len(prompt.masks)} masks for {count} images: give one mask per image"
        )
      prepared = [
        mask_ops.preprocess_mask(_pil(m, f"{where}: mask {i}"), height, width)
        for i, m in enumerate(prompt.masks)
      ]
      x["masks"] = mask_ops.layer_masks(prepared, queries)
    plans.append(
      AdapterPlan(
        image_features=kind,
        num_images=count,
        masked=prompt.masks is not None,
        weighted=prompt.weights is not None,
        precomputed=prompt.embeds is not None,
        negative_image=prompt.negative_image is not None,
      )
    )
    inputs.append(AdapterInputs(**x))
  return tuple(plans), tuple(inputs)


def save_image_embeds(path: str, embeds: Sequence[np.ndarray], kinds: Sequence[str]) -> None:
  """Writes one [2, I, ...] array (negative, positive) per adapter to a .safetensors file."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: image embeddings are written as .safetensors")
  tensors = {
    EMBEDS_KEY.format(a): np.ascontiguousarray(e, np.float32) for a, e in enumerate(embeds)
  }
  with atomic_path(path) as tmp:
    save_file(tensors, tmp, metadata={"image_features": json.dumps(list(kinds))})


def load_image_embeds(path: str) -> list[np.ndarray]:
  """The per-adapter arrays of a file written by `save_image_embeds`."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel

  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    with safe_open(path, "np") as f:
      keys = set(f.keys())
      count = len(keys)
      expected = {EMBEDS_KEY.format(a) for a in range(count)}
      if keys != expected or not keys:
        raise ValueError(
          f"{path}: not an image-embeddings file (keys {sorted(keys)[:3]}, "
          f"expected {EMBEDS_KEY.format(0)}, ...)"
        )
      return [f.get_tensor(EMBEDS_KEY.format(a)) for a in range(count)]
  except (OSError, SafetensorError) as e:
    raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None


def open_image(path: str, what: str, mode: str | None = "RGB") -> Image.Image:
  """An image file as diffusers' load_image reads it (EXIF orientation applied, then `mode`;
  None keeps the file's), or one line naming the flag and the file that is not one."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path}: no such file")
  return load_image(path, f"{what} {path}", mode=mode)
