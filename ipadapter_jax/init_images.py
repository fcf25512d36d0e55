"""Init images, inpainting masks and control images, prepared on the host as diffusers' img2img,
inpainting and ControlNet pipelines prepare them (`VaeImageProcessor`): Lanczos resize to the
output size; init pixels in [-1, 1], control pixels in [0, 1]; masks greyscale and binarised at
0.5, and nearest-neighbour downsampled to the latents.

A request's init or control image keeps its aspect ratio or is refused: diffusers stretches it
to height x width without a word, which silently distorts the picture.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ipadapter_jax.preprocessing import to_pil, to_rgb

# Relative difference of width/height ratios beyond which an init image is refused.
_ASPECT_TOLERANCE = 0.01


def default_strength(inpaint: bool, sdxl: bool) -> float:
  """diffusers' default `strength`: img2img 0.8 (SDXL 0.3), inpainting 1.0 (SDXL 0.9999)."""
  if inpaint:
    return 0.9999 if sdxl else 1.0
  return 0.3 if sdxl else 0.8


def image_size(image, multiple: int) -> tuple[int, int]:
  """(height, width) of an image rounded down to `multiple`: the output size diffusers' img2img
  pipelines use when none is given."""
  image = to_pil(image)
  return image.height - image.height % multiple, image.width - image.width % multiple


def check_aspect(image, height: int, width: int, what: str = "init image") -> None:
  """Refuses an image whose aspect ratio is not that of the height x width output."""
  image = to_pil(image)
  ours, theirs = image.width / image.height, width / height
  if abs(ours - theirs) > _ASPECT_TOLERANCE * theirs:
    raise ValueError(f"the {what} is {image.width}x{image.height} (width x height), another aspect "
                     f"ratio than the {width}x{height} output; crop it or pass a matching "
                     "height/width")


def vae_image(image, height: int, width: int) -> np.ndarray:
  """[height, width, 3] float32 in [-1, 1]: the image resized (Lanczos), as the VAE encodes it."""
  image = to_rgb(to_pil(image)).resize((width, height), resample=Image.LANCZOS)
  return np.asarray(image, np.float32) / 255.0 * 2.0 - 1.0  # diffusers' rounding


def inpaint_mask(mask, height: int, width: int) -> np.ndarray:
  """[height, width] float32 of 0s and 1s (1: repaint): resized (Lanczos), greyscale, binarised."""
  grey = to_pil(mask).resize((width, height), resample=Image.LANCZOS).convert("L")
  return (np.asarray(grey, np.float32) / 255.0 >= 0.5).astype(np.float32)


def nearest_downsample(mask_HW: np.ndarray, h: int, w: int) -> np.ndarray:
  """[h, w]: PyTorch's `F.interpolate(mode="nearest")` (source index floor(i * H / h))."""
  H, W = mask_HW.shape
  rows = np.floor(np.arange(h) * (H / h)).astype(int)
  cols = np.floor(np.arange(w) * (W / w)).astype(int)
  return mask_HW[rows][:, cols]


def control_image(image, height: int, width: int) -> np.ndarray:
  """[height, width, 3] float32 in [0, 1]: a ControlNet's conditioning image, resized (Lanczos)
  as diffusers' control image processor does."""
  image = to_rgb(to_pil(image).resize((width, height), resample=Image.LANCZOS))
  return np.asarray(image, np.float32) / 255.0


def guidance_window(start: float, end: float, steps: int, what: str = "control guidance") -> np.ndarray:
  """[steps] of 0/1: 1 where a ControlNet acts, as diffusers keeps it (off at step i when
  i / steps < start or (i + 1) / steps > end)."""
  if not 0.0 <= start < end <= 1.0:
    raise ValueError(f"{what} start {start} and end {end} must satisfy 0 <= start < end <= 1")
  i = np.arange(steps)
  return 1.0 - ((i / steps < start) | ((i + 1) / steps > end)).astype(np.float32)
