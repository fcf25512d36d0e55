"""Region masks for image prompts, as diffusers' `IPAdapterMaskProcessor` prepares and applies them.

A mask (any size, any mode) is resized to the output image's size rounded down to a multiple of
8 (Lanczos), made greyscale and binarised at 0.5. Each cross-attention layer with T queries then
sees it bicubically resized (PyTorch's `F.interpolate(mode="bicubic")`, a = -0.75, half-pixel
centres) to mask_h x mask_w, where mask_h = int(sqrt(T / (W / H))), rounded up to the next
integer when it does not divide T, and mask_w = T // mask_h, flattened row-major and padded with
zeros (or cut) to T entries. So the bicubic overshoot near an edge is kept, and a mask whose
aspect ratio differs from the image's lands on the wrong queries, both exactly as diffusers does
(docs/composition.md says where ComfyUI differs).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

_CUBIC_A = -0.75
_MULTIPLE = 8  # diffusers' IPAdapterMaskProcessor default vae_scale_factor


def preprocess_mask(mask: Image.Image, height: int, width: int) -> np.ndarray:
  """[H', W'] float32 of 0s and 1s: the mask at the output size (rounded down to a multiple of
  8)."""
  h, w = height - height % _MULTIPLE, width - width % _MULTIPLE
  if h < 1 or w < 1:
    raise ValueError(
      f"a mask needs an output of at least {_MULTIPLE}x{_MULTIPLE}, got {height}x{width}"
    )
  grey = mask.resize((w, h), resample=Image.LANCZOS).convert("L")
  values = np.asarray(grey, np.float32) / 255.0
  return (values >= 0.5).astype(np.float32)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """[..., 4] weights of the samples at offsets -1, 0, 1, 2 for fractional positions t."""
  a = _CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
  """Bicubic resampling of one axis to `size`, PyTorch's align_corners=False rule."""
  n = x.shape[axis]
  real = (np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5
  base = np.floor(real)
  weights = _cubic_weights(real - base)  # [size, 4]
  index = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, n - 1)  # [size, 4]
  moved = np.moveaxis(x, axis, -1)
  out = np.sum(moved[..., index] * weights, axis=-1)
  return np.moveaxis(out, -1, axis)


def downsample_mask(mask_HW: np.ndarray, num_queries: int) -> np.ndarray:
  """[T] float32: a preprocessed mask as the cross-attention layer with T queries applies it."""
  height, width = mask_HW.shape
  ratio = width / height
  mask_h = int(math.sqrt(num_queries / ratio))
  mask_h += int(num_queries % mask_h != 0)
  mask_w = num_queries // mask_h
  small = _resize_axis(_resize_axis(mask_HW.astype(np.float64), mask_h, 0), mask_w, 1)
  flat = small.reshape(-1)[:num_queries]
  return np.pad(flat, (0, num_queries - flat.size)).astype(np.float32)


def layer_masks(masks_IHW, query_counts) -> tuple[np.ndarray, ...]:
  """Per decoupled layer a [1, T, I] array: each of the I masks at that layer's T queries."""
  cache: dict[int, np.ndarray] = {}
  for t in set(query_counts):
    cache[t] = np.stack([downsample_mask(m, t) for m in masks_IHW], axis=-1)[None]
  return tuple(cache[t] for t in query_counts)
