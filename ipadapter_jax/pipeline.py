"""Text + image prompts -> images: prompt encoding, the sampling loop with classifier-free
guidance (text-to-image, img2img or inpainting, with ControlNets or a T2I-Adapter for
structure) and the VAE decode, compiled as one program.

Everything that changes between calls of the same shape (prompt, negative prompt, images, every
adapter's scale, weights, masks and window, guidance scale, eta, seed, initial latents, strength,
init and control images, control scales and windows) is a traced input, so it never recompiles;
each adapter's image keys/values and a T2I-Adapter's features are computed once per generation,
outside the denoising loop (docs/composition.md, docs/structure.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ipadapter_jax.conditioning import encode_image, encode_text, null_image_features
from ipadapter_jax.image_prompts import AdapterPlan, AdapterPrompt, prepare as prepare_adapters
from ipadapter_jax.preprocessing import CLIPImageConfig, clip_pixels, to_pil
from ipadapter_jax.tokenizer import tokenize
from ipadapter_jax.models.vae import scale_latents, unscale_latents
from ipadapter_jax.diffusion.samplers import Sampler, Tables, default_sampler, make_sampler
from ipadapter_jax.structure import (control_inputs, finite, image_size, init_inputs,
                                     t2i_inputs)
from ipadapter_jax.weights.stable_diffusion import StableDiffusion


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static shape of a generation: what one compiled program is specialised to."""
  sampler: Sampler
  num_inference_steps: int
  num_samples: int
  guidance: bool                      # classifier-free guidance (guidance_scale > 1)
  stochastic: bool                    # eta > 0, or an ancestral sampler: noise at every step
  adapters: tuple[AdapterPlan, ...]   # one per adapter given an image prompt (none: text only)
  sdxl_zero_negative: bool            # SDXL: zero negative embeddings for an empty negative
  task: str = "text2img"              # text2img | img2img | inpaint
  controlnets: int = 0                # how many ControlNets act (their residuals are summed)
  guess_mode: bool = False            # ControlNet guess mode (the positive half only)
  t2i_adapter: bool = False           # a T2I-Adapter's feature maps are added


def _repeat_pairs(x, n: int):
  """[2B, ...] (B negatives, B positives) -> [2Bn, ...]: each row n times, negatives first."""
  return jnp.repeat(x, n, axis=0)


def image_features(image_encoder, plan: AdapterPlan, x: dict):
  """(negative [1, I, ...], positive [R, I, ...]) image features of one adapter's prompt: saved
  ones, or its R x I images through the encoder, against the unconditional features (diffusers'
  zero embedding / mean-grey image) or the negative image's."""
  if plan.precomputed:
    return x["embeds"][:1], x["embeds"][1:]
  pixels = x["pixels"]
  rows, images = pixels.shape[:2]
  positive = encode_image(image_encoder, pixels.reshape((-1,) + pixels.shape[2:]),
                          plan.image_features)
  positive = positive.reshape((rows, images) + positive.shape[1:])
  if plan.negative_image:
    negative = encode_image(image_encoder, x["negative_pixels"], plan.image_features)
  else:
    negative = null_image_features(image_encoder, plan.image_features)[None]
  return jnp.broadcast_to(negative[:, None], (1, images) + negative.shape[1:]), positive


def _image_prompts(models, plan: Plan, adapter_inputs, requests: int):
  """Per adapter the `ImagePrompt` of the whole CFG batch ([negatives; positives], each request
  `num_samples` times), or of its positive half without guidance."""
  prompts = []
  for adapter, a_plan, x in zip(models.adapters(), plan.adapters, adapter_inputs):
    negative, positive = image_features(models.image_encoder, a_plan, x)
    features = jnp.concatenate([jnp.broadcast_to(f, (requests,) + f.shape[1:])
                                for f in (negative, positive)])
    features = _repeat_pairs(features, plan.num_samples)
    if not plan.guidance:
      features = features[features.shape[0] // 2:]
    prompts.append(adapter.encode_image_prompt(
        features.reshape((-1,) + features.shape[2:]), x["scale"], num_images=a_plan.num_images,
        weights=x.get("weights"), masks=x.get("masks")))
  return tuple(prompts)


def _encode(vae, pixels, noise):
  """Init pixels [R, H, W, 3] -> the diffusion model's latents: a posterior sample with the
  given standard normal noise, scaled (a pixel-space model takes the pixels themselves)."""
  if vae is None:
    return pixels
  mean, logvar = vae.encode(pixels)
  return scale_latents(mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32))
                       * noise, vae.config)


def _initial_latents(models, plan: Plan, inputs, tables: Tables, host_tables: Tables):
  """(latents at the run's first step, the init image's latents or None).

  text2img: the noise times the sampler's initial sigma. img2img: the init image's latents
  noised to the first step. Inpainting: the same, or the scaled noise where diffusers starts
  from noise (strength 1, or `latents=` given)."""
  sampler, noise = plan.sampler, inputs["latents"].astype(jnp.float32)
  from_noise = noise * sampler.init_noise_sigma(host_tables)
  if plan.task == "text2img":
    return from_noise, None
  image = jnp.repeat(_encode(models.vae, inputs["init_pixels"], inputs["posterior_noise"]),
                     plan.num_samples, axis=0)
  noised = sampler.add_noise(image, noise, inputs["start"], tables)
  if plan.task == "inpaint":
    noised = jnp.where(inputs["from_noise"], from_noise, noised)
  return noised, image


def _control_residuals(controlnets, plan: Plan, control, i, x, x_positive, t, context, added):
  """The ControlNets' (down residuals, mid residual) at step i, summed over the nets. They see
  the text tokens only, never the image prompt; in guess mode only the positive half, with
  zeros for the negative one (diffusers' semantics)."""
  half_only = plan.guess_mode and plan.guidance
  if half_only:
    half = context.shape[0] // 2
    x, context, added = x_positive, context[half:], {k: v[half:] for k, v in added.items()}
  down = mid = None
  for k, net in enumerate(controlnets):
    image = jnp.broadcast_to(control["images"][k], (x.shape[0],) + control["images"][k].shape[1:])
    d, m = net(x, t, context, image, conditioning_scale=control["scales"][k] * control["keep"][k, i],
               guess_mode=plan.guess_mode, **added)
    down = list(d) if down is None else [a + b for a, b in zip(down, d)]
    mid = m if mid is None else mid + m
  if half_only:
    down = [jnp.concatenate([jnp.zeros_like(r), r]) for r in down]
    mid = jnp.concatenate([jnp.zeros_like(mid), mid])
  return down, mid


def _adapter_features(t2i_adapter, t2i, batch: int):
  """The T2I-Adapter's feature maps times its scale, for every row of the UNet's batch."""
  features = t2i_adapter(t2i["image"])
  return [jnp.broadcast_to(f * t2i["scale"], (batch,) + f.shape[1:]) for f in features]


def generate(graphdef, state, inputs: dict[str, Any], *, plan: Plan, on_step=None):
  """The whole generation as one pure function of the models' state and the traced inputs."""
  models = nnx.merge(graphdef, state)
  unet, vae = models.unet, models.vae
  n = plan.num_samples   # per prompt
  half = inputs["latents"].shape[0]  # all prompts' samples: the positive half of a CFG batch
  context, pooled = encode_text(models.text_encoder, models.text_encoder_2, inputs["ids"],
                                inputs.get("ids_2"))
  if plan.sdxl_zero_negative:  # the first half of the rows are the (empty) negative prompts
    negatives = context.shape[0] // 2
    context, pooled = context.at[:negatives].set(0.0), pooled.at[:negatives].set(0.0)
  # The image tokens' keys/values: once, outside the loop.
  image_prompts = _image_prompts(models, plan, inputs.get("adapters", ()), context.shape[0] // 2)
  context = _repeat_pairs(context, n)
  added = {}
  if pooled is not None:
    added = dict(text_embeds=_repeat_pairs(pooled, n), time_ids=inputs["time_ids"])
  if not plan.guidance:  # only the positive half
    context = context[half:]
    added = {k: v[half:] for k, v in added.items()}

  sampler = plan.sampler
  host_tables = sampler.tables(plan.num_inference_steps)
  tables = Tables(*(jnp.asarray(a) for a in host_tables))
  start = inputs.get("start", 0)  # traced: a new strength does not recompile
  latents, image_latents = _initial_latents(models, plan, inputs, tables, host_tables)
  extra_channels = None  # an inpainting UNet's mask and masked-image latents
  if plan.task == "inpaint":
    mask = jnp.repeat(inputs["latent_mask"], n, axis=0)
    if unet.config.in_channels > latents.shape[-1]:
      masked = jnp.repeat(_encode(vae, inputs["masked_pixels"], inputs["masked_noise"]), n, axis=0)
      extra_channels = jnp.concatenate([mask, masked], axis=-1)
      extra_channels = jnp.concatenate([extra_channels] * 2) if plan.guidance else extra_channels

  features = (_adapter_features(models.t2i_adapter, inputs["t2i"], context.shape[0])
              if plan.t2i_adapter else None)

  def denoise(i, carry):
    latents, state = carry
    t = tables.timesteps[i]
    positive = sampler.scale_model_input(latents, i, tables)
    x = jnp.concatenate([positive, positive]) if plan.guidance else positive
    structure = {}
    if plan.controlnets:
      structure["down_residuals"], structure["mid_residual"] = _control_residuals(
          models.controlnets, plan, inputs["control"], i, x, positive, t, context, added)
    if features is not None:
      on = inputs["t2i"]["steps"][i]
      structure["intrablock_residuals"] = [f * on for f in features]
    if extra_channels is not None:
      x = jnp.concatenate([x, extra_channels], axis=-1)
    step_prompts = tuple(p._replace(scale=p.scale * a["window"][i])  # the timestep windows
                         for p, a in zip(image_prompts, inputs.get("adapters", ())))
    out = unet(x, t, context, image_prompt=step_prompts or None, **added,
               **structure).astype(jnp.float32)
    if plan.guidance:
      uncond, cond = jnp.split(out, 2)
      out = uncond + inputs["guidance_scale"] * (cond - uncond)
    noise = None
    if "step_noise" in inputs:
      noise = inputs["step_noise"][i]
    elif plan.stochastic:
      noise = jax.random.normal(jax.random.fold_in(inputs["key"], i), latents.shape)
    latents, state = sampler.advance(out, i, latents, state, tables, eta=inputs["eta"],
                                     noise=noise, start=start)
    if plan.task == "inpaint" and extra_channels is None:  # a regular UNet: keep the known part
      known = jnp.where(i + 1 < plan.num_inference_steps,
                        sampler.add_noise(image_latents, inputs["latents"], i + 1, tables),
                        image_latents)
      latents = (1 - mask) * known + mask * latents
    if on_step is not None:
      jax.debug.callback(on_step, i)
    return latents, state

  latents, _ = jax.lax.fori_loop(start, plan.num_inference_steps, denoise,
                                 (latents, sampler.init_state(latents)))
  images = latents if vae is None else vae.decode(unscale_latents(latents, vae.config))
  return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def encode_embeds(graphdef, state, adapter_inputs, *, plans):
  """Per adapter its [2, I, ...] (negative, positive) image features, for saving."""
  models = nnx.merge(graphdef, state)
  return tuple(jnp.concatenate(image_features(models.image_encoder, p, x))
               for p, x in zip(plans, adapter_inputs))


def _requests(prompt, image) -> tuple[list[str], list | None]:
  """(prompts, images or None) of equal length from single values and/or lists."""
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  images = None if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
  count = max(len(prompts), len(images or ()))
  for name, values in (("prompt", prompts), ("image", images)):
    if values is not None and len(values) not in (1, count):
      raise ValueError(f"{len(prompts)} prompts and {len(images)} images: give one of each or "
                       f"equally many")
    if values is not None and not values:
      raise ValueError(f"an empty list of {name}s")
  return prompts * (count // len(prompts)), images and images * (count // len(images))


class IPAdapterPipeline:
  """Sampling with a Stable Diffusion model and IP-Adapters (or none), with CFG."""

  def __init__(self, models: StableDiffusion, *, scheduler: str | Sampler | None = None,
               on_step: Callable[[int], None] | None = None):
    """`scheduler` (named as in diffusers' pipelines): a sampler name (`diffusion.SAMPLERS`:
    ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddpm, unipc), built from the model folder's
    scheduler config as diffusers' `from_config` builds it, or a sampler of
    `ipadapter_jax.diffusion`; None: the one the folder's config names."""
    self.models = models
    config = models.scheduler_config
    if scheduler is None or isinstance(scheduler, str):
      scheduler = make_sampler(scheduler or default_sampler(config), config)
    self.sampler = scheduler
    self.vae_scale_factor = (1 if models.vae is None else
                             2 ** (len(models.vae.config.block_out_channels) - 1))
    self._graphdef, state = nnx.split(models.networks())
    devices = jax.local_devices()  # sampling runs within one process, also in multi-host runs
    self.mesh = jax.make_mesh((len(devices),), ("data",),
                              axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    self._state = jax.device_put(state, NamedSharding(self.mesh, P()))
    self._generate = jax.jit(generate, static_argnames=("graphdef", "plan", "on_step"))
    self._encode_embeds = jax.jit(encode_embeds, static_argnames=("graphdef", "plans"))
    self._on_step = on_step

  def update_weights(self, weights) -> None:
    """Replaces some of the weights (an nnx.State of `models.networks()`, e.g. a training run's
    trainable part), each cast to the dtype it replaces, so nothing recompiles."""
    current = dict(nnx.to_flat_state(self._state))
    replicated = NamedSharding(self.mesh, P())
    new = [(path, variable.replace(jax.device_put(
               jnp.asarray(variable.get_value(), current[path].get_value().dtype), replicated)))
           for path, variable in nnx.to_flat_state(weights)]
    self._state = nnx.merge_state(self._state, nnx.from_flat_state(new))

  @property
  def scheduler(self) -> Sampler:
    """The old name of `sampler`, kept for one release."""
    return self.sampler

  @property
  def default_size(self) -> tuple[int, int]:
    """(height, width) the UNet was trained at, when its config says."""
    size = self.models.unet.config.sample_size or 64
    return size * self.vae_scale_factor, size * self.vae_scale_factor

  def prepare(self, prompt: str | Sequence[str] = "", image=None, *,
              adapters: Sequence[AdapterPrompt] | None = None,
              negative_prompt: str | None = None, scale=1.0, guidance_scale: float = 7.5,
              num_inference_steps: int = 50, eta: float = 0.0, num_samples: int = 1,
              seed: int = 0, latents=None, height: int | None = None, width: int | None = None,
              step_noise=None, init_image=None, strength: float | None = None, mask_image=None,
              posterior_noise: dict | None = None, control_images=None,
              controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
              control_guidance_end=1.0, guess_mode: bool = False, adapter_image=None,
              adapter_conditioning_scale: float = 1.0, adapter_conditioning_factor: float = 1.0):
    """Checks the request and builds (plan, inputs) for `generate`.

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
    m = self.models
    prompts, images = _requests(prompt, image)
    f = self.vae_scale_factor
    if not (height or width):
      first = lambda images: images[0] if isinstance(images, (list, tuple)) else images
      if init_image is not None and mask_image is None:
        height, width = image_size(first(init_image), f)
      elif control_images:
        height, width = image_size(first(control_images), f)
      elif adapter_image is not None and m.t2i_adapter is not None:
        height, width = image_size(adapter_image, m.t2i_adapter.config.downscale_factor)
    height, width = height or self.default_size[0], width or self.default_size[1]
    if height % f or width % f:
      raise ValueError(f"height and width must be divisible by {f}, got {height}x{width}")
    if num_samples < 1:
      raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    for name, value in (("guidance_scale", guidance_scale), ("eta", eta)):
      finite(name, value)
    channels = m.vae.config.latent_channels if m.vae is not None else m.unet.config.in_channels
    total = len(prompts) * num_samples
    shape = (total, height // f, width // f, channels)
    init_key, key = jax.random.split(jax.random.key(seed))
    latents_given = latents is not None
    if latents is None:
      latents = jax.random.normal(init_key, shape, jnp.float32)
    else:  # diffusers' layout [N, C, h, w]
      latents = np.asarray(latents, np.float32)
      expected = (total, channels, height // f, width // f)
      if latents.shape != expected:
        raise ValueError(f"initial latents have shape {list(latents.shape)}, expected "
                         f"{list(expected)} (prompts x num_samples, C, height/{f}, width/{f})")
      latents = jnp.asarray(latents.transpose(0, 2, 3, 1))

    if step_noise is not None:
      step_noise = np.asarray(step_noise, np.float32)
      expected = (num_inference_steps,) + shape[:1] + shape[3:] + shape[1:3]
      if step_noise.shape != expected:
        raise ValueError(f"step_noise has shape {list(step_noise.shape)}, expected "
                         f"{list(expected)} (steps, N, C, h, w)")
    sdxl_zero = m.is_sdxl and negative_prompt is None and m.model_index.get(
        "force_zeros_for_empty_prompt", True)
    negative = negative_prompt or ""
    texts = [negative] * len(prompts) + prompts  # all negatives, then all positives
    inputs = {"ids": tokenize(m.tokenizer, texts),
              "latents": latents, "key": key,
              "guidance_scale": jnp.float32(guidance_scale), "eta": jnp.float32(eta)}
    if m.is_sdxl:
      inputs["ids_2"] = tokenize(m.tokenizer_2, texts)
      ids = [height, width, 0, 0, height, width]  # original size, crop corner, target size
      inputs["time_ids"] = jnp.tile(jnp.asarray([ids], jnp.float32), (2 * total, 1))
    if step_noise is not None:
      inputs["step_noise"] = jnp.asarray(step_noise.transpose(0, 1, 3, 4, 2))
    task = "text2img"
    if init_image is not None or mask_image is not None:
      task = "inpaint" if mask_image is not None else "img2img"
      inputs.update(init_inputs(
          init_image, mask_image, strength, num_inference_steps, len(prompts), height, width,
          posterior_noise, init_key, vae_scale_factor=f, latent_channels=channels,
          sdxl=m.is_sdxl, given_latents=latents_given))
    elif m.unet.config.in_channels != channels:
      raise ValueError(f"this UNet takes {m.unet.config.in_channels} input channels (an "
                       "inpainting model): give an init_image and a mask_image")
    start = int(inputs.get("start", 0))
    if control_images is not None or m.controlnets:
      inputs["control"] = control_inputs(
          m.controlnets, control_images, controlnet_conditioning_scale, control_guidance_start,
          control_guidance_end, num_inference_steps, start, height, width)
    if adapter_image is not None or m.t2i_adapter is not None:
      inputs["t2i"] = t2i_inputs(m.t2i_adapter, adapter_image, adapter_conditioning_scale,
                                 adapter_conditioning_factor, num_inference_steps, start, height,
                                 width)
    guess_mode = bool(guess_mode) or any(n.config.global_pool_conditions for n in m.controlnets)
    plans = ()
    if images is not None or adapters is not None:
      plans, inputs["adapters"] = self._adapter_inputs(images, scale, adapters,
                                                       num_inference_steps, height // f, width // f,
                                                       height, width)
    plan = Plan(sampler=self.sampler, num_inference_steps=num_inference_steps,
                num_samples=num_samples, guidance=guidance_scale > 1,
                stochastic=eta > 0 or self.sampler.needs_noise, adapters=plans,
                sdxl_zero_negative=bool(sdxl_zero), task=task,
                controlnets=len(m.controlnets), guess_mode=guess_mode and bool(m.controlnets),
                t2i_adapter=m.t2i_adapter is not None)
    return plan, inputs

  def _adapter_inputs(self, images, scale, adapters, num_steps, latent_h, latent_w, height, width):
    m = self.models
    loaded = m.adapters()
    if not loaded:
      raise ValueError("an image prompt needs an IP-Adapter (load the model with ip_adapter=...)")
    if images is not None and adapters is not None:
      raise ValueError("give either image (with scale) or adapters, not both")
    feature_shapes = None
    if m.image_encoder is not None:
      c = m.image_encoder.config
      tokens = (c.image_size // c.patch_size) ** 2 + 1
      feature_shapes = {"image_embeds": (c.projection_dim,),
                        "hidden_states": (tokens, c.hidden_size)}
    context = dict(layer_names=m.unet.cross_attention_names(),
                   queries=m.unet.cross_attention_queries(latent_h, latent_w),
                   num_steps=num_steps, height=height, width=width,
                   processor=m.image_processor, has_encoder=m.image_encoder is not None,
                   feature_shapes=feature_shapes)
    if adapters is not None:
      return prepare_adapters(list(adapters), loaded, **context)
    if len(loaded) > 1:
      raise ValueError(f"{len(loaded)} adapters are loaded: give one AdapterPrompt each "
                       "(adapters=[...])")
    # The shorthand: one image per request for the one adapter.
    plans, arrays = prepare_adapters([AdapterPrompt(images=images[:1], scale=scale)], loaded,
                                     **context)
    processor = m.image_processor or CLIPImageConfig()
    arrays[0]["pixels"] = clip_pixels([to_pil(i) for i in images], processor)[:, None]
    return plans, arrays

  def image_embeds(self, adapters: Sequence[AdapterPrompt]) -> list[np.ndarray]:
    """Per adapter its images' features [2, I, ...] (negative, positive), to save with
    `image_prompts.save_image_embeds` and reuse as `AdapterPrompt(embeds=...)`."""
    h, w = self.default_size
    f = self.vae_scale_factor
    plans, arrays = self._adapter_inputs(None, 1.0, adapters, 1, h // f, w // f, h, w)
    return [np.asarray(e) for e in self._encode_embeds(self._graphdef, self._state, arrays,
                                                       plans=plans)]

  def _shard(self, inputs):
    n = inputs["latents"].shape[0]
    batch = P("data") if n % self.mesh.size == 0 else P()
    out = dict(inputs)
    out["latents"] = jax.device_put(inputs["latents"], NamedSharding(self.mesh, batch))
    return out

  def compile(self, **request):
    """Compiles (without running) the program for a request; returns the compiled executable."""
    plan, inputs = self.prepare(**request)
    return self._generate.lower(self._graphdef, self._state, self._shard(inputs), plan=plan,
                                on_step=self._on_step).compile()

  def __call__(self, prompt: str | Sequence[str] = "", image=None, **request) -> np.ndarray:
    """Images [requests x num_samples, H, W, 3] float32 in [0, 1] (diffusers' output_type="np"),
    grouped by request."""
    plan, inputs = self.prepare(prompt, image, **request)
    images = self._generate(self._graphdef, self._state, self._shard(inputs), plan=plan,
                            on_step=self._on_step)
    return np.asarray(images)

  def cache_size(self) -> int:
    """How many programs have been compiled (for checking that nothing recompiles)."""
    return self._generate._cache_size()  # pylint: disable=protected-access
