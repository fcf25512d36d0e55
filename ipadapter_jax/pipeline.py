"""Text + image prompts -> images: prompt encoding, the DDIM loop with classifier-free guidance and
the VAE decode, compiled as one program.

Everything that changes between calls of the same shape (prompt, negative prompt, image, adapter
scale, guidance scale, eta, seed, initial latents) is a traced input, so it never recompiles;
the image tokens' keys/values are computed once per generation, outside the denoising loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ipadapter_jax.conditioning import encode_image_or_null, encode_text
from ipadapter_jax.preprocessing import CLIPImageConfig, clip_pixels, to_pil
from ipadapter_jax.tokenizer import tokenize
from ipadapter_jax.models.vae import unscale_latents
from ipadapter_jax.schedulers import DDIM
from ipadapter_jax.weights.pipeline import StableDiffusion


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static shape of a generation: what one compiled program is specialised to."""
  ddim: DDIM
  num_inference_steps: int
  num_samples: int
  guidance: bool                      # classifier-free guidance (guidance_scale > 1)
  stochastic: bool                    # eta > 0
  image_prompt: bool
  image_features: str | None          # the adapter's (AdapterConfig.image_features)
  sdxl_zero_negative: bool            # SDXL: zero negative embeddings for an empty negative


def _repeat_pairs(x, n: int):
  """[2B, ...] (B negatives, B positives) -> [2Bn, ...]: each row n times, negatives first."""
  return jnp.repeat(x, n, axis=0)


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
  image_prompt = None
  if plan.image_prompt:  # [unconditional, conditional] features of every request's image
    pixels = inputs["pixels"]
    null_B = jnp.arange(2 * pixels.shape[0]) < pixels.shape[0]
    features = encode_image_or_null(models.image_encoder, jnp.concatenate([pixels, pixels]),
                                    null_B, plan.image_features)
    image_prompt = unet.encode_image_prompt(_repeat_pairs(features, n), inputs["scale"])
  context = _repeat_pairs(context, n)
  added = {}
  if pooled is not None:
    added = dict(text_embeds=_repeat_pairs(pooled, n), time_ids=inputs["time_ids"])
  if not plan.guidance:  # only the positive half
    context = context[half:]
    added = {k: v[half:] for k, v in added.items()}
    if image_prompt is not None:
      image_prompt = image_prompt._replace(kv=jax.tree.map(lambda a: a[half:], image_prompt.kv))

  timesteps = jnp.asarray(plan.ddim.timesteps(plan.num_inference_steps))

  def denoise(i, latents):
    t = timesteps[i]
    x = jnp.concatenate([latents, latents]) if plan.guidance else latents
    out = unet(x, t, context, image_prompt=image_prompt, **added).astype(jnp.float32)
    if plan.guidance:
      uncond, cond = jnp.split(out, 2)
      out = uncond + inputs["guidance_scale"] * (cond - uncond)
    noise = (jax.random.normal(jax.random.fold_in(inputs["key"], i), latents.shape)
             if plan.stochastic else None)
    latents = plan.ddim.step(out, t, latents, num_inference_steps=plan.num_inference_steps,
                             eta=inputs["eta"], noise=noise)
    if on_step is not None:
      jax.debug.callback(on_step, i)
    return latents

  latents = jax.lax.fori_loop(0, plan.num_inference_steps, denoise,
                              inputs["latents"].astype(jnp.float32))
  images = latents if vae is None else vae.decode(unscale_latents(latents, vae.config))
  return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def _finite(name: str, value):
  """Refuses NaN or infinite request numbers (they would give a garbage image)."""
  array = np.asarray(value, np.float64)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} must be finite, got {value!r}")


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
  """Sampling with a Stable Diffusion model and an IP-Adapter (or none), DDIM + CFG."""

  def __init__(self, models: StableDiffusion, *, scheduler: DDIM | None = None,
               on_step: Callable[[int], None] | None = None):
    self.models = models
    self.scheduler = scheduler or DDIM.from_diffusers(models.scheduler_config)
    self.vae_scale_factor = (1 if models.vae is None else
                             2 ** (len(models.vae.config.block_out_channels) - 1))
    self._graphdef, state = nnx.split(models.networks())
    devices = jax.local_devices()  # sampling runs within one process, also in multi-host runs
    self.mesh = jax.make_mesh((len(devices),), ("data",),
                              axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    self._state = jax.device_put(state, NamedSharding(self.mesh, P()))
    self._generate = jax.jit(generate, static_argnames=("graphdef", "plan", "on_step"))
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
  def default_size(self) -> tuple[int, int]:
    """(height, width) the UNet was trained at, when its config says."""
    size = self.models.unet.config.sample_size or 64
    return size * self.vae_scale_factor, size * self.vae_scale_factor

  def prepare(self, prompt: str | Sequence[str] = "", image=None, *,
              negative_prompt: str | None = None, scale=1.0, guidance_scale: float = 7.5,
              num_inference_steps: int = 50, eta: float = 0.0, num_samples: int = 1,
              seed: int = 0, latents=None, height: int | None = None, width: int | None = None):
    """Checks the request and builds (plan, inputs) for `generate`.

    `prompt` and `image` may be lists (one entry per request, a single value is shared); every
    request gets `num_samples` images. `negative_prompt=None` is diffusers' default: the empty
    text, or zero embeddings for SDXL models with `force_zeros_for_empty_prompt`.
    """
    m = self.models
    prompts, images = _requests(prompt, image)
    height, width = height or self.default_size[0], width or self.default_size[1]
    f = self.vae_scale_factor
    if height % f or width % f:
      raise ValueError(f"height and width must be divisible by {f}, got {height}x{width}")
    if num_samples < 1:
      raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    for name, value in (("scale", scale), ("guidance_scale", guidance_scale), ("eta", eta)):
      _finite(name, value)
    channels, total = m.unet.config.in_channels, len(prompts) * num_samples
    shape = (total, height // f, width // f, channels)
    init_key, key = jax.random.split(jax.random.key(seed))
    if latents is None:
      latents = jax.random.normal(init_key, shape, jnp.float32)
    else:  # diffusers' layout [N, C, h, w]
      latents = np.asarray(latents, np.float32)
      expected = (total, channels, height // f, width // f)
      if latents.shape != expected:
        raise ValueError(f"initial latents have shape {list(latents.shape)}, expected "
                         f"{list(expected)} (prompts x num_samples, C, height/{f}, width/{f})")
      latents = jnp.asarray(latents.transpose(0, 2, 3, 1))
    if images is not None and m.unet.image_proj is None:
      raise ValueError("an image prompt needs an IP-Adapter (load the model with ip_adapter=...)")
    if images is not None and m.image_encoder is None:
      raise ValueError("an image prompt needs a CLIP image encoder (image_encoder=...)")

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
    if images is not None:
      processor = m.image_processor or CLIPImageConfig()
      inputs["pixels"] = clip_pixels([to_pil(i) for i in images], processor)
      inputs["scale"] = jnp.asarray(scale, jnp.float32)
    kind = None if m.unet.adapter_config is None else m.unet.adapter_config.image_features
    plan = Plan(ddim=self.scheduler, num_inference_steps=num_inference_steps,
                num_samples=num_samples, guidance=guidance_scale > 1,
                stochastic=eta > 0, image_prompt=images is not None, image_features=kind,
                sdxl_zero_negative=bool(sdxl_zero))
    return plan, inputs

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
