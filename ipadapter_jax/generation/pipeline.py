"""Text + image prompts -> images: prompt encoding, the sampling loop with classifier-free
guidance (text-to-image, img2img or inpainting, with ControlNets or a T2I-Adapter for
structure) and the VAE decode, compiled as one program.

A call's arguments become a `request.Plan` (static: what the program is specialised to) and a
`request.Inputs` pytree (traced). Everything that changes between calls of the same shape
(prompt, negative prompt, images, every adapter's scale, weights, masks and window, guidance
scale, eta, seed, initial latents, strength, init and control images, control scales and
windows) is traced, so it never recompiles; each adapter's image keys/values and a
T2I-Adapter's features are computed once per generation, outside the denoising loop
(docs/composition.md, docs/structure.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from ipadapter_jax.diffusion.samplers import Sampler, Tables, default_sampler, make_sampler
from ipadapter_jax.generation.conditioning import encode_image, encode_text, null_image_features
from ipadapter_jax.generation.image_prompts import AdapterInputs, AdapterPlan, AdapterPrompt
from ipadapter_jax.generation.request import (
  INPAINT,
  TEXT2IMG,
  Inputs,
  Plan,
  Request,
  default_size,
  image_prompt_inputs,
  plan_generation,
  vae_scale_factor,
)
from ipadapter_jax.models.vae import scale_latents, unscale_latents
from ipadapter_jax.weights.stable_diffusion import StableDiffusion


class TextConditioning(NamedTuple):
  """What the UNet (and the ControlNets) read of the text, for every row of its batch."""

  context: jax.Array  # [rows, S, D]
  added: dict  # SDXL: text_embeds and time_ids; else empty


def _repeat_pairs(x, n: int):
  """[2B, ...] (B negatives, B positives) -> [2Bn, ...]: each row n times, negatives first."""
  return jnp.repeat(x, n, axis=0)


def _positive_half(x):
  return x[x.shape[0] // 2 :]


def image_features(image_encoder, plan: AdapterPlan, x: AdapterInputs):
  """(negative [1, I, ...], positive [R, I, ...]) image features of one adapter's prompt: saved
  ones, or its R x I images through the encoder, against the unconditional features (diffusers'
  zero embedding / mean-grey image) or the negative image's."""
  if plan.precomputed:
    return x.embeds[:1], x.embeds[1:]
  pixels = x.pixels
  rows, images = pixels.shape[:2]
  positive = encode_image(
    image_encoder, pixels.reshape((-1,) + pixels.shape[2:]), plan.image_features
  )
  positive = positive.reshape((rows, images) + positive.shape[1:])
  if plan.negative_image:
    negative = encode_image(image_encoder, x.negative_pixels, plan.image_features)
  else:
    negative = null_image_features(image_encoder, plan.image_features)[None]
  return jnp.broadcast_to(negative[:, None], (1, images) + negative.shape[1:]), positive


def _image_prompts(models, plan: Plan, adapter_inputs, requests: int):
  """Per adapter the `ImagePrompt` of the whole CFG batch ([negatives; positives], each request
  `num_samples` times), or of its positive half without guidance."""
  prompts = []
  for adapter, a_plan, x in zip(models.adapters(), plan.adapters, adapter_inputs):
    negative, positive = image_features(models.image_encoder, a_plan, x)
    features = jnp.concatenate(
      [jnp.broadcast_to(f, (requests,) + f.shape[1:]) for f in (negative, positive)]
    )
    features = _repeat_pairs(features, plan.num_samples)
    if not plan.guidance:
      features = _positive_half(features)
    prompts.append(
      adapter.encode_image_prompt(
        features.reshape((-1,) + features.shape[2:]),
        x.scale,
        num_images=a_plan.num_images,
        weights=x.weights,
        masks=x.masks,
      )
    )
  return tuple(prompts)


def _text_conditioning(models, plan: Plan, inputs: Inputs) -> TextConditioning:
  """The prompts' tokens and (SDXL) pooled embeddings and size conditioning, each request
  `num_samples` times; the positive half only without guidance."""
  context, pooled = encode_text(
    models.text_encoder, models.text_encoder_2, inputs.ids, inputs.ids_2
  )
  if plan.sdxl_zero_negative:  # the first half of the rows are the (empty) negative prompts
    negatives = context.shape[0] // 2
    context, pooled = context.at[:negatives].set(0.0), pooled.at[:negatives].set(0.0)
  context = _repeat_pairs(context, plan.num_samples)
  added = {}
  if pooled is not None:
    added = dict(text_embeds=_repeat_pairs(pooled, plan.num_samples), time_ids=inputs.time_ids)
  if not plan.guidance:
    context, added = _positive_half(context), {k: _positive_half(v) for k, v in added.items()}
  return TextConditioning(context, added)


def _encode(vae, pixels, noise):
  """Init pixels [R, H, W, 3] -> the diffusion model's latents: a posterior sample with the
  given standard normal noise, scaled (a pixel-space model takes the pixels themselves)."""
  if vae is None:
    return pixels
  mean, logvar = vae.encode(pixels)
  return scale_latents(
    mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise, vae.config
  )


def _initial_latents(models, plan: Plan, inputs: Inputs, tables: Tables, host_tables: Tables):
  """(latents at the run's first step, the init image's latents or None).

  text2img: the noise times the sampler's initial sigma. img2img: the init image's latents
  noised to the first step. Inpainting: the same, or the scaled noise where diffusers starts
  from noise (strength 1, or `latents=` given)."""
  sampler, noise, init = plan.sampler, inputs.latents.astype(jnp.float32), inputs.init
  from_noise = noise * sampler.init_noise_sigma(host_tables)
  if plan.task == TEXT2IMG:
    return from_noise, None
  image = jnp.repeat(
    _encode(models.vae, init.pixels, init.posterior_noise), plan.num_samples, axis=0
  )
  noised = sampler.add_noise(image, noise, init.start, tables)
  if plan.task == INPAINT:
    noised = jnp.where(init.from_noise, from_noise, noised)
  return noised, image


def _inpainting_channels(models, plan: Plan, inputs: Inputs, latent_channels: int):
  """An inpainting UNet's extra input channels (the mask and the masked image's latents) for
  every row of its batch; None for a UNet that takes the latents alone."""
  if plan.task != INPAINT or models.unet.config.in_channels == latent_channels:
    return None
  n, init = plan.num_samples, inputs.init
  masked = jnp.repeat(_encode(models.vae, init.masked_pixels, init.masked_noise), n, axis=0)
  extra = jnp.concatenate([jnp.repeat(init.latent_mask, n, axis=0), masked], axis=-1)
  return jnp.concatenate([extra] * 2) if plan.guidance else extra


def _keep_known(plan: Plan, inputs: Inputs, tables: Tables, i, latents, image_latents, mask):
  """Inpainting with a regular UNet: the known part (where `mask` is 0) put back after step i,
  noised to the next step (or clean after the last)."""
  known = jnp.where(
    i + 1 < plan.num_inference_steps,
    plan.sampler.add_noise(image_latents, inputs.latents, i + 1, tables),
    image_latents,
  )
  return (1 - mask) * known + mask * latents


def _control_residuals(
  controlnets, plan: Plan, inputs: Inputs, i, x, x_positive, t, text: TextConditioning
):
  """The ControlNets' (down residuals, mid residual) at step i, summed over the nets. They see
  the text tokens only, never the image prompt; in guess mode only the positive half, with
  zeros for the negative one (diffusers' semantics)."""
  control = inputs.control
  context, added = text
  half_only = plan.guess_mode and plan.guidance
  if half_only:
    x, context = x_positive, _positive_half(context)
    added = {k: _positive_half(v) for k, v in added.items()}
  down = mid = None
  for k, net in enumerate(controlnets):
    image = jnp.broadcast_to(control.images[k], (x.shape[0],) + control.images[k].shape[1:])
    d, m = net(
      x,
      t,
      context,
      image,
      conditioning_scale=control.scales[k] * control.keep[k, i],
      guess_mode=plan.guess_mode,
      **added,
    )
    down = list(d) if down is None else [a + b for a, b in zip(down, d)]
    mid = m if mid is None else mid + m
  if half_only:
    down = [jnp.concatenate([jnp.zeros_like(r), r]) for r in down]
    mid = jnp.concatenate([jnp.zeros_like(mid), mid])
  return down, mid


def _t2i_features(t2i_adapter, inputs: Inputs, batch: int):
  """The T2I-Adapter's feature maps times its scale, for every row of the UNet's batch."""
  features = t2i_adapter(inputs.t2i.image)
  return [jnp.broadcast_to(f * inputs.t2i.scale, (batch,) + f.shape[1:]) for f in features]


def _structure_residuals(
  models, plan: Plan, inputs: Inputs, i, x, x_positive, t, text: TextConditioning, t2i_features
) -> dict:
  """The UNet's residual inputs at step i: the ControlNets' and the T2I-Adapter's."""
  residuals = {}
  if plan.controlnets:
    residuals["down_residuals"], residuals["mid_residual"] = _control_residuals(
      models.controlnets, plan, inputs, i, x, x_positive, t, text
    )
  if t2i_features is not None:
    on = inputs.t2i.steps[i]
    residuals["intrablock_residuals"] = [f * on for f in t2i_features]
  return residuals


def _windowed(image_prompts, inputs: Inputs, i):
  """The image prompts of step i: each adapter's scale times its timestep window."""
  return (
    tuple(p._replace(scale=p.scale * a.window[i]) for p, a in zip(image_prompts, inputs.adapters))
    or None
  )


def _guided(out, plan: Plan, guidance_scale):
  """Classifier-free guidance: uncond + scale * (cond - uncond) over the batch's two halves."""
  if not plan.guidance:
    return out
  uncond, cond = jnp.split(out, 2)
  return uncond + guidance_scale * (cond - uncond)


def _step_noise(plan: Plan, inputs: Inputs, i, shape):
  """The noise a stochastic step adds: the given step noise, else drawn from the seed."""
  if inputs.step_noise is not None:
    return inputs.step_noise[i]
  if plan.stochastic:
    return jax.random.normal(jax.random.fold_in(inputs.key, i), shape)
  return None


def generate(graphdef, state, inputs: Inputs, *, plan: Plan, on_step=None):
  """The whole generation as one pure function of the models' state and the traced inputs."""
  models = nnx.merge(graphdef, state)
  unet, vae, sampler = models.unet, models.vae, plan.sampler
  text = _text_conditioning(models, plan, inputs)
  # The image tokens' keys/values and the T2I-Adapter's features: once, outside the loop.
  requests = inputs.ids.shape[0] // 2
  image_prompts = _image_prompts(models, plan, inputs.adapters, requests)
  t2i_features = (
    _t2i_features(models.t2i_adapter, inputs, text.context.shape[0]) if plan.t2i_adapter else None
  )

  host_tables = sampler.tables(plan.num_inference_steps)
  tables = Tables(*(jnp.asarray(a) for a in host_tables))
  latents, image_latents = _initial_latents(models, plan, inputs, tables, host_tables)
  extra_channels = _inpainting_channels(models, plan, inputs, latents.shape[-1])
  keep_known = plan.task == INPAINT and extra_channels is None
  if keep_known:
    mask = jnp.repeat(inputs.init.latent_mask, plan.num_samples, axis=0)

  def denoise(i, carry):
    latents, state = carry
    t = tables.timesteps[i]
    positive = sampler.scale_model_input(latents, i, tables)
    x = jnp.concatenate([positive, positive]) if plan.guidance else positive
    residuals = _structure_residuals(models, plan, inputs, i, x, positive, t, text, t2i_features)
    if extra_channels is not None:
      x = jnp.concatenate([x, extra_channels], axis=-1)
    out = unet(
      x,
      t,
      text.context,
      image_prompt=_windowed(image_prompts, inputs, i),
      **text.added,
      **residuals,
    ).astype(jnp.float32)
    latents, state = sampler.advance(
      _guided(out, plan, inputs.guidance_scale),
      i,
      latents,
      state,
      tables,
      eta=inputs.eta,
      noise=_step_noise(plan, inputs, i, latents.shape),
      start=inputs.start,
    )
    if keep_known:
      latents = _keep_known(plan, inputs, tables, i, latents, image_latents, mask)
    if on_step is not None:
      jax.debug.callback(on_step, i)
    return latents, state

  latents, _ = jax.lax.fori_loop(
    inputs.start, plan.num_inference_steps, denoise, (latents, sampler.init_state(latents))
  )
  images = latents if vae is None else vae.decode(unscale_latents(latents, vae.config))
  return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def encode_embeds(graphdef, state, adapter_inputs, *, plans):
  """Per adapter its [2, I, ...] (negative, positive) image features, for saving."""
  models = nnx.merge(graphdef, state)
  return tuple(
    jnp.concatenate(image_features(models.image_encoder, p, x))
    for p, x in zip(plans, adapter_inputs)
  )


def latents_sharding(mesh, images: int) -> NamedSharding:
  """The start noise split over the sampling mesh's devices along the batch, where it divides
  evenly; else replicated."""
  return NamedSharding(mesh, P("data") if images % mesh.size == 0 else P())


OUTPUT_TYPES = ("pil", "np")


def pil_images(images: np.ndarray) -> list[Image.Image]:
  """[N, H, W, 3] floats in [0, 1] -> N RGB images, each value rounded to the nearest of 256
  levels (as diffusers' `output_type="pil"` and `preprocessing.image_grid` round)."""
  return [Image.fromarray(image) for image in (np.asarray(images) * 255).round().astype(np.uint8)]


@dataclasses.dataclass(frozen=True)
class PipelineOutput:
  """What a pipeline call returns, like diffusers' pipeline outputs: `images` is a list of PIL
  images (`output_type="pil"`) or one float32 array [N, H, W, 3] in [0, 1] (`"np"`)."""

  images: list[Image.Image] | np.ndarray


class IPAdapterPipeline:
  """Sampling with a Stable Diffusion model and IP-Adapters (or none), with CFG."""

  def __init__(
    self,
    models: StableDiffusion,
    *,
    scheduler: str | Sampler | None = None,
    on_step: Callable[[int], None] | None = None,
  ):
    """`scheduler` (named as in diffusers' pipelines): a sampler name (`diffusion.SAMPLERS`:
    ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddpm, unipc), built from the model folder's
    scheduler config as diffusers' `from_config` builds it, or a sampler of
    `ipadapter_jax.diffusion`; None: the one the folder's config names."""
    self.models = models
    config = models.scheduler_config
    if scheduler is None or isinstance(scheduler, str):
      scheduler = make_sampler(scheduler or default_sampler(config), config)
    self.sampler = scheduler
    self.vae_scale_factor = vae_scale_factor(models)
    self._graphdef, state = nnx.split(models.networks())
    devices = jax.local_devices()  # sampling runs within one process, also in multi-host runs
    self.mesh = jax.make_mesh(
      (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )
    self._state = jax.device_put(state, NamedSharding(self.mesh, P()))
    self._generate = jax.jit(generate, static_argnames=("graphdef", "plan", "on_step"))
    self._encode_embeds = jax.jit(encode_embeds, static_argnames=("graphdef", "plans"))
    self._on_step = on_step

  def update_weights(self, weights) -> None:
    """Replaces some of the weights (an nnx.State of `models.networks()`, e.g. a training run's
    trainable part), each cast to the dtype it replaces, so nothing recompiles."""
    current = dict(nnx.to_flat_state(self._state))
    replicated = NamedSharding(self.mesh, P())
    new = [
      (
        path,
        variable.replace(
          jax.device_put(
            jnp.asarray(variable.get_value(), current[path].get_value().dtype), replicated
          )
        ),
      )
      for path, variable in nnx.to_flat_state(weights)
    ]
    self._state = nnx.merge_state(self._state, nnx.from_flat_state(new))

  @property
  def scheduler(self) -> Sampler:
    """The old name of `sampler`, kept for one release."""
    return self.sampler

  @property
  def default_size(self) -> tuple[int, int]:
    """(height, width) the UNet was trained at, when its config says."""
    return default_size(self.models)

  def prepare(self, prompt: str | Sequence[str] = "", image=None, **request) -> tuple[Plan, Inputs]:
    """Checks a request (the arguments of `request.Request`) and builds the (plan, inputs) of
    `generate`."""
    return plan_generation(self.models, self.sampler, Request(prompt, image, **request))

  def image_embeds(self, adapters: Sequence[AdapterPrompt]) -> list[np.ndarray]:
    """Per adapter its images' features [2, I, ...] (negative, positive), to save with
    `image_prompts.save_image_embeds` and reuse as `AdapterPrompt(embeds=...)`."""
    h, w = self.default_size
    plans, inputs = image_prompt_inputs(self.models, None, 1.0, adapters, 1, h, w)
    return [
      np.asarray(e) for e in self._encode_embeds(self._graphdef, self._state, inputs, plans=plans)
    ]

  def _shard(self, inputs: Inputs) -> Inputs:
    return inputs.replace(
      latents=jax.device_put(inputs.latents, latents_sharding(self.mesh, inputs.latents.shape[0]))
    )

  def compile(self, **request):
    """Compiles (without running) the program for a request; returns the compiled executable."""
    plan, inputs = self.prepare(**request)
    return self._generate.lower(
      self._graphdef, self._state, self._shard(inputs), plan=plan, on_step=self._on_step
    ).compile()

  def __call__(
    self, prompt: str | Sequence[str] = "", image=None, *, output_type: str = "pil", **request
  ) -> PipelineOutput:
    """The images of a request, requests x num_samples of them grouped by request, in
    `.images`: PIL images, or with `output_type="np"` one float32 array [N, H, W, 3] in [0, 1]
    (as diffusers returns them). The other arguments are `request.Request`'s: diffusers' names
    and defaults."""
    if output_type not in OUTPUT_TYPES:
      raise ValueError(
        f"output_type: expected one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}"
      )
    plan, inputs = self.prepare(prompt, image, **request)
    images = np.asarray(
      self._generate(
        self._graphdef, self._state, self._shard(inputs), plan=plan, on_step=self._on_step
      )
    )
    return PipelineOutput(pil_images(images) if output_type == "pil" else images)

  def cache_size(self) -> int:
    """How many programs have been compiled (for checking that nothing recompiles)."""
    return self._generate._cache_size()  # pylint: disable=protected-access
