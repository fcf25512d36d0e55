"""The host-side inputs of img2img, inpainting, ControlNet and T2I-Adapter, prepared as
diffusers' pipelines prepare them (`VaeImageProcessor`): Lanczos resize to the output size; init
pixels in [-1, 1], control pixels in [0, 1]; masks greyscale and binarised at 0.5, and
nearest-neighbour downsampled to the latents; the first step from `strength`; each ControlNet's
and the T2I-Adapter's per-step 0/1 table. All of it becomes traced inputs of one program
(`InitInputs`, `ControlInputs`, `T2IInputs`).

A request's init, control or adapter image keeps its aspect ratio or is refused: diffusers
stretches it to height x width without a word, which silently distorts the picture.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from PIL import Image

from ipadapter_jax.diffusion.samplers import first_step
from ipadapter_jax.preprocessing import preprocess_adapter_image, to_pil, to_rgb

# Relative difference of width/height ratios beyond which an init image is refused.
_ASPECT_TOLERANCE = 0.01


@struct.dataclass
class InitInputs:
  """img2img and inpainting: R init images, their latents' size h x w x C."""

  pixels: jax.Array  # [R, H, W, 3] in [-1, 1]
  posterior_noise: jax.Array  # [R, h, w, C] the VAE posterior sample's noise
  start: jax.Array  # the first step that runs (from strength)
  latent_mask: jax.Array | None = None  # inpainting: [R, h, w, 1], 1 where repainted
  masked_pixels: jax.Array | None = None  # [R, H, W, 3] the init pixels with the hole zeroed
  masked_noise: jax.Array | None = None  # [R, h, w, C] its posterior sample's noise
  from_noise: jax.Array | None = None  # start from pure noise (strength 1 or latents= given)


@struct.dataclass
class ControlInputs:
  """K ControlNets over S steps."""

  images: tuple[jax.Array, ...]  # per net [1, H, W, 3] in [0, 1]
  scales: jax.Array  # [K]
  keep: jax.Array  # [K, S] 1 where a net acts


@struct.dataclass
class T2IInputs:
  """The T2I-Adapter over S steps."""

  image: jax.Array  # [1, H, W, C]
  scale: jax.Array
  steps: jax.Array  # [S] 1 where its features are added


def finite(name: str, value) -> None:
  """Refuses NaN or infinite request numbers (they would give a garbage image)."""
  array = np.asarray(value, np.float64)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} must be finite, got {value!r}")


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
    raise ValueError(
      f"the {what} is {image.width}x{image.height} (width x height), another aspect "
      f"ratio than the {width}x{height} output; crop it or pass a matching "
      "height/width"
    )


def vae_image(image, height: int, width: int) -> np.ndarray:
  """[height, width, 3] float32 in [-1, 1]: the image resized (Lanczos), as the VAE encodes it."""
  image = to_rgb(to_pil(image)).resize((width, height), resample=Image.LANCZOS)
  return np.asarray(image, np.float32) / 255.0 * 2.0 - 1.0  # diffusers' rounding


def inpaint_mask(mask, height: int, width: int) -> np.ndarray:
  """[height, width] float32 of 0s and 1s (1: repaint): resized (Lanczos), greyscale, binarised."""
  grey = to_pil(mask).resize((width, height), resample=Image.LANCZOS).convert("L")
  return (np.asarray(grey, np.float32) / 255.0 >= 0.5).astype(np.float32)


def _nearest_index(source: int, target: int) -> np.ndarray:
  """PyTorch's nearest source index, floor(i * (source / target)) in float32 as it computes it
  (float64 picks another row for some sizes, e.g. 60 -> 22)."""
  ratio = np.float32(source) / np.float32(target)
  index = np.floor(np.arange(target, dtype=np.float32) * ratio).astype(int)
  return np.minimum(index, source - 1)


def nearest_downsample(mask_HW: np.ndarray, h: int, w: int) -> np.ndarray:
  """[h, w]: PyTorch's `F.interpolate(mode="nearest")`."""
  H, W = mask_HW.shape
  return mask_HW[_nearest_index(H, h)][:, _nearest_index(W, w)]


def control_image(image, height: int, width: int) -> np.ndarray:
  """[height, width, 3] float32 in [0, 1]: a ControlNet's conditioning image, resized (Lanczos)
  as diffusers' control image processor does."""
  # As diffusers' control processor: resize, then drop any alpha channel (PIL's convert; nothing
  # is composited onto a background).
  image = to_pil(image).resize((width, height), resample=Image.LANCZOS).convert("RGB")
  return np.asarray(image, np.float32) / 255.0


def guidance_window(
  start: float, end: float, steps: int, what: str = "control guidance"
) -> np.ndarray:
  """[steps] of 0/1: 1 where a ControlNet acts, as diffusers keeps it (off at step i when
  i / steps < start or (i + 1) / steps > end)."""
  if not 0.0 <= start < end <= 1.0:
    raise ValueError(f"{what} start {start} and end {end} must satisfy 0 <= start < end <= 1")
  i = np.arange(steps)
  return 1.0 - ((i / steps < start) | ((i + 1) / steps > end)).astype(np.float32)


def control_inputs(
  nets, images, scales, starts, ends, num_steps, start, height, width
) -> ControlInputs:
  """Each ControlNet's conditioning pixels [1, H, W, 3], scale and per-step 0/1 table (the
  windows are fractions of the steps that run, from `start`)."""
  if not nets:
    raise ValueError("control images need a ControlNet (load the model with controlnet=...)")
  images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
  if len(images) != len(nets):
    raise ValueError(
      f"{len(images)} control images for {len(nets)} ControlNets: give one "
      "per ControlNet, in load order"
    )

  def per_net(value, what):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * len(nets)
    if len(values) != len(nets):
      raise ValueError(f"{len(values)} values of {what} for {len(nets)} ControlNets")
    for v in values:
      finite(what, v)
    return values

  scales = per_net(scales, "controlnet_conditioning_scale")
  starts = per_net(starts, "control_guidance_start")
  ends = per_net(ends, "control_guidance_end")
  for image in images:
    check_aspect(image, height, width, "control image")
  run = num_steps - start  # the windows are fractions of the steps that run
  keep = np.zeros((len(nets), num_steps), np.float32)
  for k, (s, e) in enumerate(zip(starts, ends)):
    keep[k, start:] = guidance_window(float(s), float(e), run)
  return ControlInputs(
    images=tuple(jnp.asarray(control_image(i, height, width)[None]) for i in images),
    scales=jnp.asarray(scales, jnp.float32),
    keep=jnp.asarray(keep),
  )


def t2i_inputs(adapter, image, scale, factor, num_steps, start, height, width) -> T2IInputs:
  """The T2I-Adapter's input pixels [1, H, W, C], scale and per-step 0/1 table."""
  if adapter is None:
    raise ValueError("an adapter_image needs a T2I-Adapter (load the model with t2i_adapter=...)")
  if image is None:
    raise ValueError("a T2I-Adapter is loaded: give its adapter_image")
  finite("adapter_conditioning_scale", scale)
  if not 0.0 <= factor <= 1.0:
    raise ValueError(f"adapter_conditioning_factor must be in [0, 1], got {factor}")
  check_aspect(image, height, width, "adapter image")
  steps = np.zeros((num_steps,), np.float32)
  steps[start : start + int((num_steps - start) * factor)] = 1.0
  return T2IInputs(
    image=jnp.asarray(preprocess_adapter_image(image, height, width)[None]),
    scale=jnp.float32(scale),
    steps=jnp.asarray(steps),
  )


def init_inputs(
  init_image,
  mask_image,
  strength,
  num_steps,
  requests,
  height,
  width,
  posterior_noise,
  key,
  *,
  vae_scale_factor: int,
  latent_channels: int,
  sdxl: bool,
  given_latents: bool,
) -> InitInputs:
  """The traced inputs of img2img and inpainting: init pixels, the posterior noise, the first
  step, and for inpainting the mask (at the latents' size) and the masked pixels."""
  if init_image is None:
    raise ValueError("a mask_image needs an init_image (the image to inpaint)")
  f = vae_scale_factor
  inpaint = mask_image is not None
  strength = default_strength(inpaint, sdxl) if strength is None else strength
  finite("strength", strength)
  start = first_step(num_steps, strength)

  def per_request(value, what):
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, requests):
      raise ValueError(f"{len(values)} {what}s for {requests} requests: give one, or one each")
    return values * (requests // len(values))

  inits = per_request(init_image, "init image")
  for image in inits:
    check_aspect(image, height, width)
  pixels = np.stack([vae_image(image, height, width) for image in inits])
  latent_shape = (requests, height // f, width // f, latent_channels)
  noise_keys = jax.random.split(jax.random.fold_in(key, 1), 2)
  given = dict(posterior_noise or {})
  unknown = set(given) - {"init_image", "masked_image"}
  if unknown:
    raise ValueError(
      f"posterior_noise keys are 'init_image' and 'masked_image', got {sorted(unknown)}"
    )

  def noise(name, k):
    if name not in given:
      return jax.random.normal(k, latent_shape, jnp.float32)
    array = np.asarray(given[name], np.float32)
    expected = (latent_shape[0], latent_shape[3]) + latent_shape[1:3]
    if array.shape != expected:
      raise ValueError(
        f"posterior_noise['{name}'] has shape {list(array.shape)}, expected "
        f"{list(expected)} (requests, C, h, w)"
      )
    return jnp.asarray(array.transpose(0, 2, 3, 1))

  init = InitInputs(
    pixels=jnp.asarray(pixels),
    posterior_noise=noise("init_image", noise_keys[0]),
    start=jnp.int32(start),
  )
  if not inpaint:
    return init
  masks = np.stack(
    [inpaint_mask(mask, height, width) for mask in per_request(mask_image, "mask image")]
  )[..., None]
  latent_mask = np.stack(
    [nearest_downsample(mask[..., 0], height // f, width // f) for mask in masks]
  )[..., None]
  return init.replace(
    latent_mask=jnp.asarray(latent_mask),
    masked_pixels=jnp.asarray(pixels * (masks < 0.5)),
    masked_noise=noise("masked_image", noise_keys[1]),
    from_noise=jnp.asarray(strength == 1.0 or given_latents),
  )
