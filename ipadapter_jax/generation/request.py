"""A generation request as typed data: the caller's arguments (`Request`, diffusers' names and
defaults) checked on the host and turned into the static `Plan` one compiled program is
specialised to and the `Inputs` pytree it reads. Nothing here runs a model.

Everything that may change without recompiling is a field of `Inputs`; everything that changes
the program's shape (how many steps, samples, adapters, ControlNets; guidance on or off; the
task) is a field of `Plan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ipadapter_jax.diffusion.samplers import Sampler
from ipadapter_jax.generation.image_prompts import (
  AdapterInputs,
  AdapterPlan,
  AdapterPrompt,
  adapter_inputs,
)
from ipadapter_jax.generation.structure import (
  ControlInputs,
  InitInputs,
  T2IInputs,
  control_inputs,
  finite,
  image_size,
  init_inputs,
  t2i_inputs,
)
from ipadapter_jax.preprocessing import CLIPImageConfig, clip_pixels, to_pil
from ipadapter_jax.tokenizer import tokenize

TEXT2IMG, IMG2IMG, INPAINT = "text2img", "img2img", "inpaint"


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static shape of a generation: what one compiled program is specialised to."""

  sampler: Sampler
  num_inference_steps: int
  num_samples: int
  guidance: bool  # classifier-free guidance (guidance_scale > 1)
  stochastic: bool  # eta > 0, or an ancestral sampler: noise at every step
  adapters: tuple[AdapterPlan, ...]  # one per adapter given an image prompt (none: text only)
  sdxl_zero_negative: bool  # SDXL: zero negative embeddings for an empty negative
  task: str = TEXT2IMG  # text2img | img2img | inpaint
  controlnets: int = 0  # how many ControlNets act (their residuals are summed)
  guess_mode: bool = False  # ControlNet guess mode (the positive half only)
  t2i_adapter: bool = False  # a T2I-Adapter's feature maps are added


@struct.dataclass
class Inputs:
  """The traced inputs of one generation. R requests, N = R x num_samples images; latents are
  NHWC ([N, h, w, C]); rows of text are all negatives, then all positives."""

  ids: jax.Array  # [2R, S] token ids
  latents: jax.Array  # [N, h, w, C] standard normal start noise
  key: jax.Array  # the seed's key for the noise of stochastic steps
  guidance_scale: jax.Array
  eta: jax.Array
  ids_2: jax.Array | None = None  # SDXL's second tokenizer's ids [2R, S]
  time_ids: jax.Array | None = None  # SDXL's size conditioning [2N, 6]
  step_noise: jax.Array | None = None  # [steps, N, h, w, C]: replaces the drawn step noise
  init: InitInputs | None = None  # img2img / inpainting
  control: ControlInputs | None = None
  t2i: T2IInputs | None = None
  adapters: tuple[AdapterInputs, ...] = ()

  @property
  def start(self):
    """The first step that runs (0, or later for img2img and inpainting)."""
    return 0 if self.init is None else self.init.start


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation's arguments, with diffusers' names and defaults.

  `prompt` and `image` may be lists (one entry per request, a single value is shared); every
  request gets `num_samples` images. `image` with `scale` is the one-adapter shorthand; with
  several adapters (or several images, masks, windows, negative images, saved embeddings)
  pass `adapters`, one `AdapterPrompt` per loaded adapter, shared by every request.
  `negative_prompt=None` is diffusers' default: the empty text, or zero embeddings for SDXL
  models with `force_zeros_for_empty_prompt`. `step_noise` [steps, N, C, h, w] (diffusers'
  layout) replaces the noise a stochastic step draws from the seed (to reproduce another
  implementation's run).

  `init_image` (one, or one per request) starts from that image noised to `strength`
  (img2img; default as diffusers: 0.8, SDXL 0.3); with `mask_image` the white part is
  repainted and the rest kept (inpainting; default strength 1.0, SDXL 0.9999), by an
  inpainting UNet (9 input channels) or, with a regular UNet, by putting the known part back
  after every step. Without height/width an img2img output has the init image's size.
  `latents` is then diffusers' noise: added to the init image's latents (img2img), or as
  the inpainting pipelines' `latents=` (the start, scaled by the initial sigma).
  `posterior_noise` {"init_image": [R, C, h, w], "masked_image": ...} replaces the seed's
  noise of the VAE posterior samples (to reproduce another implementation's run).

  `control_images` (one per loaded ControlNet, in load order) give structure control, each
  net with its `controlnet_conditioning_scale` and acting from `control_guidance_start` to
  `control_guidance_end` (fractions of the steps that run; a value or one per net);
  `guess_mode` as diffusers'. `adapter_image` is the loaded T2I-Adapter's input, its features
  times `adapter_conditioning_scale`, added in the first `adapter_conditioning_factor` of the
  steps. Without height/width the output takes the control (or adapter) image's size, as
  diffusers' ControlNet and T2I-Adapter pipelines do.
  """

  prompt: str | Sequence[str] = ""
  image: Any = None
  adapters: Sequence[AdapterPrompt] | None = None
  negative_prompt: str | None = None
  scale: Any = 1.0
  guidance_scale: float = 7.5
  num_inference_steps: int = 50
  eta: float = 0.0
  num_samples: int = 1
  seed: int = 0
  latents: Any = None
  height: int | None = None
  width: int | None = None
  step_noise: Any = None
  init_image: Any = None
  strength: float | None = None
  mask_image: Any = None
  posterior_noise: dict | None = None
  control_images: Any = None
  controlnet_conditioning_scale: Any = 1.0
  control_guidance_start: Any = 0.0
  control_guidance_end: Any = 1.0
  guess_mode: bool = False
  adapter_image: Any = None
  adapter_conditioning_scale: float = 1.0
  adapter_conditioning_factor: float = 1.0

  @property
  def task(self) -> str:
    if self.mask_image is not None:
      return INPAINT
    return IMG2IMG if self.init_image is not None else TEXT2IMG


def vae_scale_factor(models) -> int:
  """Pixels per latent along each side (1 for a pixel-space model)."""
  return 1 if models.vae is None else 2 ** (len(models.vae.config.block_out_channels) - 1)


def default_size(models) -> tuple[int, int]:
  """(height, width) the UNet was trained at, when its config says (else 64 latents)."""
  size = (models.unet.config.sample_size or 64) * vae_scale_factor(models)
  return size, size


def split_requests(prompt, image) -> tuple[list[str], list | None]:
  """(prompts, images or None) of equal length from single values and/or lists."""
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  images = None if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
  count = max(len(prompts), len(images or ()))
  for name, values in (("prompt", prompts), ("image", images)):
    if values is not None and len(values) not in (1, count):
      raise ValueError(
        f"{len(prompts)} prompts and {len(images)} images: give one of each or equally many"
      )
    if values is not None and not values:
      raise ValueError(f"an empty list of {name}s")
  return prompts * (count // len(prompts)), images and images * (count // len(images))


def output_size(models, request: Request) -> tuple[int, int]:
  """(height, width): the request's, else the image that sets it (as diffusers' pipelines do),
  else the UNet's default; refused unless divisible by the VAE's factor."""
  height, width = request.height, request.width
  f = vae_scale_factor(models)
  first = lambda images: images[0] if isinstance(images, (list, tuple)) else images
  if not (height or width):
    if request.init_image is not None and request.mask_image is None:
      height, width = image_size(first(request.init_image), f)
    elif request.control_images:
      height, width = image_size(first(request.control_images), f)
    elif request.adapter_image is not None and models.t2i_adapter is not None:
      height, width = image_size(request.adapter_image, models.t2i_adapter.config.downscale_factor)
  height, width = height or default_size(models)[0], width or default_size(models)[1]
  if height % f or width % f:
    raise ValueError(f"height and width must be divisible by {f}, got {height}x{width}")
  return height, width


def start_noise(given, shape, key) -> jax.Array:
  """[N, h, w, C]: diffusers' `latents=` ([N, C, h, w]) when given, else drawn from `key`."""
  if given is None:
    return jax.random.normal(key, shape, jnp.float32)
  given = np.asarray(given, np.float32)
  expected = (shape[0], shape[3]) + shape[1:3]
  if given.shape != expected:
    raise ValueError(
      f"initial latents have shape {list(given.shape)}, expected "
      f"{list(expected)} (prompts x num_samples, C, height/f, width/f)"
    )
  return jnp.asarray(given.transpose(0, 2, 3, 1))


def step_noise(given, steps: int, shape) -> jax.Array | None:
  """[steps, N, h, w, C] from diffusers' layout [steps, N, C, h, w], or None."""
  if given is None:
    return None
  given = np.asarray(given, np.float32)
  expected = (steps,) + shape[:1] + shape[3:] + shape[1:3]
  if given.shape != expected:
    raise ValueError(
      f"step_noise has shape {list(given.shape)}, expected {list(expected)} (steps, N, C, h, w)"
    )
  return jnp.asarray(given.transpose(0, 1, 3, 4, 2))


def text_inputs(models, prompts, negative_prompt, images: int, height: int, width: int) -> dict:
  """Token ids of all negatives then all positives; for SDXL the second tokenizer's ids and the
  size conditioning (original size, crop corner, target size) of every row of the CFG batch."""
  texts = [negative_prompt or ""] * len(prompts) + list(prompts)
  text = {"ids": tokenize(models.tokenizer, texts)}
  if models.is_sdxl:
    text["ids_2"] = tokenize(models.tokenizer_2, texts)
    time_ids = [height, width, 0, 0, height, width]
    text["time_ids"] = jnp.tile(jnp.asarray([time_ids], jnp.float32), (2 * images, 1))
  return text


def zero_negative(models, negative_prompt) -> bool:
  """SDXL's `force_zeros_for_empty_prompt`: zero negative embeddings when none is given."""
  return bool(
    models.is_sdxl
    and negative_prompt is None
    and models.model_index.get("force_zeros_for_empty_prompt", True)
  )


def image_prompt_inputs(
  models, images, scale, adapters, num_steps: int, height: int, width: int
) -> tuple[tuple[AdapterPlan, ...], tuple[AdapterInputs, ...]]:
  """Per loaded adapter its plan and inputs: from `adapters` (one `AdapterPrompt` each), or the
  shorthand of one image per request (its own CLIP pixels) for a single loaded adapter."""
  loaded = models.adapters()
  if not loaded:
    raise ValueError("an image prompt needs an IP-Adapter (load the model with ip_adapter=...)")
  if images is not None and adapters is not None:
    raise ValueError("give either image (with scale) or adapters, not both")
  feature_shapes = None
  if models.image_encoder is not None:
    c = models.image_encoder.config
    tokens = (c.image_size // c.patch_size) ** 2 + 1
    feature_shapes = {"image_embeds": (c.projection_dim,), "hidden_states": (tokens, c.hidden_size)}
  f = vae_scale_factor(models)
  context = dict(
    layer_names=models.unet.cross_attention_names(),
    queries=models.unet.cross_attention_queries(height // f, width // f),
    num_steps=num_steps,
    height=height,
    width=width,
    processor=models.image_processor,
    has_encoder=models.image_encoder is not None,
    feature_shapes=feature_shapes,
  )
  if adapters is not None:
    return adapter_inputs(list(adapters), loaded, **context)
  if len(loaded) > 1:
    raise ValueError(
      f"{len(loaded)} adapters are loaded: give one AdapterPrompt each (adapters=[...])"
    )
  plans, (inputs,) = adapter_inputs(
    [AdapterPrompt(images=images[:1], scale=scale)], loaded, **context
  )
  processor = models.image_processor or CLIPImageConfig()
  pixels = clip_pixels([to_pil(i) for i in images], processor)[:, None]
  return plans, (dataclasses.replace(inputs, pixels=pixels),)


def plan_generation(models, sampler: Sampler, request: Request) -> tuple[Plan, Inputs]:
  """Checks the request and builds the (plan, inputs) of one generation."""
  r = request
  prompts, images = split_requests(r.prompt, r.image)
  height, width = output_size(models, r)
  if r.num_samples < 1:
    raise ValueError(f"num_samples must be at least 1, got {r.num_samples}")
  finite("guidance_scale", r.guidance_scale)
  finite("eta", r.eta)
  m, f, steps = models, vae_scale_factor(models), r.num_inference_steps
  channels = m.vae.config.latent_channels if m.vae is not None else m.unet.config.in_channels
  total = len(prompts) * r.num_samples
  shape = (total, height // f, width // f, channels)
  init_key, key = jax.random.split(jax.random.key(r.seed))
  latents = start_noise(r.latents, shape, init_key)
  noise = step_noise(r.step_noise, steps, shape)

  init = None
  if r.task != TEXT2IMG:
    init = init_inputs(
      r.init_image,
      r.mask_image,
      r.strength,
      steps,
      len(prompts),
      height,
      width,
      r.posterior_noise,
      init_key,
      vae_scale_factor=f,
      latent_channels=channels,
      sdxl=m.is_sdxl,
      given_latents=r.latents is not None,
    )
  elif m.unet.config.in_channels != channels:
    raise ValueError(
      f"this UNet takes {m.unet.config.in_channels} input channels (an "
      "inpainting model): give an init_image and a mask_image"
    )
  start = 0 if init is None else int(init.start)
  control = t2i = None
  if r.control_images is not None or m.controlnets:
    control = control_inputs(
      m.controlnets,
      r.control_images,
      r.controlnet_conditioning_scale,
      r.control_guidance_start,
      r.control_guidance_end,
      steps,
      start,
      height,
      width,
    )
  if r.adapter_image is not None or m.t2i_adapter is not None:
    t2i = t2i_inputs(
      m.t2i_adapter,
      r.adapter_image,
      r.adapter_conditioning_scale,
      r.adapter_conditioning_factor,
      steps,
      start,
      height,
      width,
    )
  adapter_plans, adapters = (), ()
  if images is not None or r.adapters is not None:
    adapter_plans, adapters = image_prompt_inputs(
      m, images, r.scale, r.adapters, steps, height, width
    )

  guess_mode = bool(r.guess_mode) or any(n.config.global_pool_conditions for n in m.controlnets)
  plan = Plan(
    sampler=sampler,
    num_inference_steps=steps,
    num_samples=r.num_samples,
    guidance=r.guidance_scale > 1,
    stochastic=r.eta > 0 or sampler.needs_noise,
    adapters=adapter_plans,
    sdxl_zero_negative=zero_negative(m, r.negative_prompt),
    task=r.task,
    controlnets=len(m.controlnets),
    guess_mode=guess_mode and bool(m.controlnets),
    t2i_adapter=m.t2i_adapter is not None,
  )
  inputs = Inputs(
    latents=latents,
    key=key,
    guidance_scale=jnp.float32(r.guidance_scale),
    eta=jnp.float32(r.eta),
    step_noise=noise,
    init=init,
    control=control,
    t2i=t2i,
    adapters=adapters,
    **text_inputs(m, prompts, r.negative_prompt, total, height, width),
  )
  return plan, inputs
