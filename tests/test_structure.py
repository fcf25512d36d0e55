"""The host-side helpers of ipadapter_jax.generation.structure against diffusers' pipelines and
processors (img2img / inpainting / ControlNet preparation) and PyTorch's nearest interpolation."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import (
  StableDiffusionControlNetPipeline,
  StableDiffusionImg2ImgPipeline,
  StableDiffusionInpaintPipeline,
  StableDiffusionXLImg2ImgPipeline,
  StableDiffusionXLInpaintPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ipadapter_jax.generation.structure import (
  check_aspect,
  control_image,
  default_strength,
  finite,
  guidance_window,
  image_size,
  inpaint_mask,
  nearest_downsample,
  vae_image,
)

RNG = np.random.default_rng(0)


def _photo(width, height, seed=0):
  """A smooth-ish RGB image (noise plus gradients): Lanczos rounding shows on every pixel."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 3.0)], -1)
  return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))


def _colour_mask(width, height, seed=1):
  """An RGB mask whose colours have grey levels on both sides of 0.5 with smooth edges, so that
  the greyscale weights, the threshold and the order of resize and conversion all matter."""
  rng = np.random.default_rng(seed)
  coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
  return coarse.resize((width, height), resample=Image.BILINEAR)


def _nhwc(tensor_BCHW):
  return tensor_BCHW[0].numpy().transpose(1, 2, 0)


def test_finite_refuses_nan_and_inf_in_scalars_and_lists():
  """Catches a check of NaN only (not inf), or of the first element of a list only."""
  for ok in (0.0, 7.5, -3, [1.0, 2.0], np.array([0.5, 1e30])):
    finite("x", ok)
  for bad in (float("nan"), float("inf"), -np.inf, [1.0, float("nan")], np.array([0.0, np.inf])):
    with pytest.raises(ValueError, match=r"guidance_scale must be finite, got"):
      finite("guidance_scale", bad)


def test_default_strength_is_diffusers_pipelines_default():
  """Catches the four defaults swapped or mistyped (SDXL inpainting's is 0.9999, not 1.0)."""
  cases = {
    (False, False): StableDiffusionImg2ImgPipeline,
    (True, False): StableDiffusionInpaintPipeline,
    (False, True): StableDiffusionXLImg2ImgPipeline,
    (True, True): StableDiffusionXLInpaintPipeline,
  }
  for (inpaint, sdxl), pipeline in cases.items():
    expected = inspect.signature(pipeline.__call__).parameters["strength"].default
    assert default_strength(inpaint, sdxl) == expected, pipeline.__name__


@pytest.mark.parametrize("multiple", [8, 16])
def test_image_size_is_diffusers_default_height_width(multiple):
  """Catches (width, height) swapped, or rounding up instead of down to the multiple."""
  processor = VaeImageProcessor(vae_scale_factor=multiple)
  for width, height in [(64, 48), (45, 60), (100, 37), (17, 130), (multiple, 2 * multiple + 7)]:
    image = _photo(width, height)
    expected = processor.get_default_height_width(image)
    assert image_size(image, multiple) == expected
    assert image_size(np.asarray(image), multiple) == expected  # a uint8 [H, W, 3] array too


def test_check_aspect_tolerance_is_relative_and_orientation_matters():
  """Catches width and height swapped, an absolute tolerance (too loose for tall outputs), and
  a refusal of ratios within the 1% tolerance."""
  check_aspect(_photo(300, 200), 64, 96)  # 1.5 == 1.5
  check_aspect(_photo(302, 200), 64, 96)  # 0.7% wider: accepted
  check_aspect(_photo(298, 200), 64, 96)  # 0.7% narrower: accepted
  check_aspect(np.zeros((200, 300, 3), np.uint8), 64, 96)  # arrays are [H, W, C]
  for image, (height, width) in [
    (_photo(304, 200), (64, 96)),  # 1.3% wider
    (_photo(200, 300), (64, 96)),  # portrait for landscape
    (_photo(300, 200), (96, 64)),  # landscape for portrait
    (_photo(21, 200), (640, 64)),
  ]:  # 0.105 vs 0.1: 5% off, 0.005 abs.
    with pytest.raises(
      ValueError,
      match=r"the control image is \d+x\d+ \(width x height\), "
      r"another aspect ratio",
    ):
      check_aspect(image, height, width, "control image")


@pytest.mark.parametrize("size", [(48, 64), (64, 48), (24, 32), (40, 40)])
def test_vae_image_is_diffusers_vae_image_processor(size):
  """Catches another resampling filter than Lanczos, height and width swapped, and another
  scaling than diffusers' x / 255 * 2 - 1 (bit for bit)."""
  height, width = size
  image = _photo(45, 60) if height > width else _photo(60, 45)
  expected = _nhwc(
    VaeImageProcessor(vae_scale_factor=8).preprocess(image, height=height, width=width)
  )
  got = vae_image(image, height, width)
  assert got.dtype == np.float32 and got.shape == (height, width, 3)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(vae_image(np.asarray(image), height, width), expected)


@pytest.mark.parametrize("mode", ["RGB", "L", "array"])
def test_inpaint_mask_is_diffusers_mask_processor(mode):
  """Catches a threshold other than 0.5 of the [0, 1] grey level, a channel taken instead of
  the luminance, conversion before resizing (diffusers resizes first), and 1 / 0 inverted."""
  mask = _colour_mask(50, 70)
  mask = {"RGB": mask, "L": mask.convert("L"), "array": np.asarray(mask)}[mode]
  processor = VaeImageProcessor(
    vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
  )
  pil = mask if isinstance(mask, Image.Image) else Image.fromarray(mask)
  expected = _nhwc(processor.preprocess(pil, height=56, width=40))[..., 0]
  got = inpaint_mask(mask, 56, 40)
  assert got.dtype == np.float32 and got.shape == (56, 40)
  assert 0.2 < expected.mean() < 0.8  # both sides of the threshold are present
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
  "shape,size",
  [
    ((64, 48), (8, 6)),
    ((37, 53), (5, 7)),
    ((45, 30), (16, 11)),
    ((30, 20), (7, 9)),
    ((99, 70), (12, 9)),
    ((20, 13), (9, 6)),
  ],
)
def test_nearest_downsample_is_torch_nearest(shape, size):
  """Catches rounding to the nearest source index or half-pixel centres ("nearest-exact")
  instead of PyTorch's floor(i * H / h), and rows and columns swapped."""
  mask = RNG.random(shape).astype(np.float32)
  expected = torch.nn.functional.interpolate(
    torch.from_numpy(mask)[None, None], size=size, mode="nearest"
  )[0, 0].numpy()
  np.testing.assert_array_equal(nearest_downsample(mask, *size), expected)


def test_nearest_downsample_for_every_size_pair():
  """Catches the source index computed in float64 (PyTorch computes i * (H / h) in float32,
  which picks another row for some sizes, e.g. 60 -> 22)."""
  for H in range(1, 80):
    column = np.arange(H, dtype=np.float32)[:, None]
    for h in range(1, 40):
      expected = torch.nn.functional.interpolate(
        torch.from_numpy(column)[None, None], size=(h, 1), mode="nearest"
      )[0, 0].numpy()
      np.testing.assert_array_equal(nearest_downsample(column, h, 1), expected, f"{H} -> {h}")


def test_nearest_downsample_at_every_latent_size():
  """The sizes pipelines use: a multiple of 8 down to the latents, 8 to 2048 pixels."""
  for size in range(8, 2049, 8):
    column = np.arange(size, dtype=np.float32)[:, None]
    expected = torch.nn.functional.interpolate(
      torch.from_numpy(column)[None, None], size=(size // 8, 1), mode="nearest"
    )[0, 0].numpy()
    np.testing.assert_array_equal(nearest_downsample(column, size // 8, 1), expected)


def _transparent(image):
  """The image with an alpha channel from fully transparent to opaque."""
  alpha = Image.fromarray(
    np.linspace(0, 255, image.width * image.height)
    .astype(np.uint8)
    .reshape(image.height, image.width)
  )
  rgba = image.convert("RGBA")
  rgba.putalpha(alpha)
  return rgba


@pytest.mark.parametrize("mode", ["RGB", "L", "array", "RGBA"])
def test_control_image_is_diffusers_control_image_processor(mode):
  """Catches [-1, 1] normalisation (a control image stays in [0, 1]), a greyscale image left
  with one channel, another resampling filter, and transparency composited onto a background
  (diffusers drops the alpha channel after resizing)."""
  image = _photo(60, 45, seed=3)
  image = {
    "RGB": image,
    "L": image.convert("L"),
    "array": np.asarray(image),
    "RGBA": _transparent(image),
  }[mode]
  processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
  pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
  expected = _nhwc(processor.preprocess(pil, height=48, width=64))
  got = control_image(image, 48, 64)
  assert got.dtype == np.float32 and got.shape == (48, 64, 3)
  np.testing.assert_array_equal(got, expected)


# diffusers' ControlNet pipeline, verbatim (checked against the installed source below).
_DIFFUSERS_KEEP = "1.0 - float(i / len(timesteps) < s or (i + 1) / len(timesteps) > e)"


def test_guidance_window_is_diffusers_controlnet_keep():
  """Catches < for <= at either edge, the end tested at i / steps instead of (i + 1) / steps,
  and a window of rounded step indices (int(start * steps)) instead of fractions."""
  assert _DIFFUSERS_KEEP in inspect.getsource(StableDiffusionControlNetPipeline.__call__)
  windows = [
    (0.0, 1.0),
    (0.1, 0.9),
    (0.3, 0.7),
    (0.25, 0.75),
    (1 / 3, 2 / 3),
    (0.0, 0.5),
    (0.5, 1.0),
    (0.2, 0.21),
    (0.05, 0.35),
    (0.6, 0.8),
  ]
  for steps in (1, 3, 4, 7, 10, 20, 25, 30, 50):
    timesteps = range(steps)
    for s, e in windows:
      expected = [
        eval(_DIFFUSERS_KEEP, {"i": i, "s": s, "e": e, "timesteps": timesteps})  # pylint: disable=eval-used
        for i in range(steps)
      ]
      got = guidance_window(s, e, steps)
      assert got.dtype == np.float32 and got.shape == (steps,)
      np.testing.assert_array_equal(
        got, np.asarray(expected, np.float32), err_msg=f"{steps} {s} {e}"
      )


def test_guidance_window_refuses_what_diffusers_refuses():
  """diffusers' check_inputs: start >= end, start < 0 and end > 1 are errors."""
  for start, end in [(0.5, 0.5), (0.7, 0.3), (-0.1, 0.5), (0.0, 1.01)]:
    with pytest.raises(
      ValueError,
      match=rf"adapter guidance start {start} and end {end} must "
      r"satisfy 0 <= start < end <= 1",
    ):
      guidance_window(start, end, 10, "adapter guidance")
