"""The train state, the optimizer and the train step (a pure function, jitted once by the loop).

The models travel as one `Networks` graph, split into the trainable weights (inside the UNet: the
adapter, the UNet, or both; the two CLIP towers; or the VAE) and everything frozen. Only the
trainable part is differentiated, updated and checkpointed. Three objectives: denoising (the UNet,
the adapter), CLIP's contrastive loss (the CLIP towers) and the VAE's reconstruction loss; the toy
world trains its CLIP and VAE from scratch with the last two.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ipadapter_jax.diffusion.schedule import NoiseSchedule, add_noise, training_target
from ipadapter_jax.generation.conditioning import (
  CACHE_KEYS,
  encode_image_or_null,
  encode_text,
  where_batch,
)
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.vae import VAEConfig, sample_posterior, scale_latents

TRAINABLE = ("adapter", "unet", "all", "clip", "vae")


def trainable_filter(trainable: str):
  """An NNX filter over a `Networks` graph selecting what trains."""
  if trainable not in TRAINABLE:
    raise ValueError(f"model.trainable must be one of {TRAINABLE}, got {trainable!r}")
  if trainable == "adapter":
    return AdapterParam
  if trainable == "clip":
    return nnx.All(
      nnx.Param, lambda path, _: bool(path) and path[0] in ("text_encoder", "image_encoder")
    )
  if trainable == "vae":
    return nnx.All(nnx.Param, lambda path, _: bool(path) and path[0] == "vae")
  in_unet = lambda path, _: bool(path) and path[0] == "unet"
  if trainable == "unet":
    return nnx.All(nnx.Param, nnx.Not(AdapterParam), in_unet)
  return nnx.All(nnx.Param, in_unet)


class TrainState(NamedTuple):
  step: jax.Array
  params: Any  # the trainable nnx.State
  opt_state: Any
  ema: Any  # an EMA of params, or None


def init_state(params, *, optimizer: optax.GradientTransformation, ema: bool) -> TrainState:
  """A fresh train state: float32 weights, the optimizer's state and (optionally) the EMA.

  Meant for `jax.jit(..., out_shardings=...)`, so every leaf is created in place on its devices.
  """
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return TrainState(
    jnp.zeros((), jnp.int32),
    params,
    optimizer.init(params),
    jax.tree.map(jnp.copy, params) if ema else None,
  )


def make_schedule(cfg, num_steps: int) -> optax.Schedule:
  """The learning rate per step: constant or cosine, after an optional linear warm-up."""
  if cfg.schedule == "constant":
    schedule = optax.constant_schedule(cfg.learning_rate)
  elif cfg.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, max(1, num_steps - cfg.warmup_steps))
  else:
    raise ValueError(f"optimizer.schedule must be constant or cosine, got {cfg.schedule!r}")
  if cfg.warmup_steps:
    schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), schedule],
      [cfg.warmup_steps],
    )
  return schedule


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  """AdamW with the configured schedule, clipping and gradient accumulation."""
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  chain.append(
    optax.adamw(
      make_schedule(cfg, num_steps),
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
    )
  )
  tx = optax.chain(*chain)
  if cfg.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps)
  return tx


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static choices of a train step."""

  schedule: NoiseSchedule | None  # None for the contrastive objective
  image_features: str | None  # the adapter's (AdapterConfig.image_features); None: no adapter
  drop_image: float
  drop_text: float
  drop_both: float
  cached: bool  # batches hold encoder outputs (data.cache), not pixels/ids
  latents: VAEConfig | None  # how latents are scaled; None for a pixel-space model
  snr_gamma: float = 0.0
  ema_decay: float = 0.0
  objective: str = "denoise"  # or "contrastive" (the CLIP towers) or "autoencode" (the VAE)
  temperature: float = 0.07  # contrastive: the fixed softmax temperature
  kl_weight: float = 1e-6  # autoencode: the KL term's weight against the pixel MSE


def drop_masks(key, batch_size: int, spec: StepSpec):
  """(image dropped, text dropped) per example, from one uniform draw (docs/reference.md §5)."""
  r = jax.random.uniform(key, (batch_size,))
  image_only = r < spec.drop_image
  text_only = (r >= spec.drop_image) & (r < spec.drop_image + spec.drop_text)
  both = (r >= spec.drop_image + spec.drop_text) & (
    r < spec.drop_image + spec.drop_text + spec.drop_both
  )
  return image_only | both, text_only | both


def conditions(models, batch, empty, drop_image_B, drop_text_B, spec: StepSpec):
  """(context, image features, SDXL added conditions) after condition dropout."""
  added = {}
  if spec.cached:
    context = where_batch(drop_text_B, empty["text_context"], batch["text_context"])
    if "text_pooled" in batch:
      added = dict(
        text_embeds=where_batch(drop_text_B, empty["text_pooled"], batch["text_pooled"]),
        time_ids=batch["time_ids"],
      )
  else:
    ids = where_batch(drop_text_B, empty["input_ids"], batch["input_ids"])
    ids_2 = (
      None
      if models.text_encoder_2 is None
      else where_batch(drop_text_B, empty["input_ids_2"], batch["input_ids_2"])
    )
    context, pooled = encode_text(models.text_encoder, models.text_encoder_2, ids, ids_2)
    if pooled is not None:
      added = dict(text_embeds=pooled, time_ids=batch["time_ids"])

  features = None
  if spec.image_features is not None and spec.cached:
    features = where_batch(
      drop_image_B, empty["image_features"], batch[CACHE_KEYS[spec.image_features]]
    )
  elif spec.image_features is not None:
    features = encode_image_or_null(
      models.image_encoder, batch["clip_pixels"], drop_image_B, spec.image_features
    )
  return jax.lax.stop_gradient(context), features, added


def clean_latents(models, batch, key, spec: StepSpec):
  """The diffusion model's clean input: pixels, or a scaled draw from the VAE posterior."""
  if spec.latents is None:  # pixel space
    return batch["pixels"].astype(jnp.float32)
  if spec.cached:
    mean, logvar = batch["latent_mean"], batch["latent_logvar"]
  else:
    mean, logvar = models.vae.encode(batch["pixels"])
  return jax.lax.stop_gradient(scale_latents(sample_posterior(mean, logvar, key), spec.latents))


def loss_fn(params, frozen, graphdef, batch, empty, key, spec: StepSpec):
  """The step's objective, in float32."""
  models = nnx.merge(graphdef, params, frozen)
  if spec.objective == "contrastive":
    return contrastive_loss(models, batch, spec.temperature)
  if spec.objective == "autoencode":
    return autoencoder_loss(models.vae, batch["pixels"], key, spec.kl_weight)
  return denoising_loss(models, batch, empty, key, spec)


def _unit(x):
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def contrastive_loss(models, batch, temperature: float):
  """CLIP's symmetric cross-entropy over the batch's image-caption similarities. Examples with
  identical token ids are positives of each other (small vocabularies repeat captions)."""
  ids = batch["input_ids"]
  text = _unit(models.text_encoder(ids).text_embeds)
  image = _unit(models.image_encoder(batch["clip_pixels"]).image_embeds)
  logits = image @ text.T / temperature
  same = jnp.all(ids[:, None] == ids[None], axis=-1).astype(jnp.float32)  # symmetric
  targets = same / jnp.sum(same, axis=-1, keepdims=True)
  return 0.5 * (
    jnp.mean(optax.softmax_cross_entropy(logits, targets))
    + jnp.mean(optax.softmax_cross_entropy(logits.T, targets))
  )


def autoencoder_loss(vae, pixels, key, kl_weight: float):
  """The VAE's objective without its adversarial and perceptual terms: the pixel MSE of a
  decoded posterior draw plus `kl_weight` times the posterior's KL divergence from N(0, I) per
  latent element (both means, so the weight does not depend on the image size)."""
  mean, logvar = vae.encode(pixels)
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  decoded = vae.decode(sample_posterior(mean, logvar, key)).astype(jnp.float32)
  reconstruction = jnp.mean(jnp.square(decoded - pixels.astype(jnp.float32)))
  kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return reconstruction + kl_weight * kl


def min_snr_weight(snr_B, gamma: float, prediction_type: str):
  """Min-SNR-gamma loss weights (Hang et al. 2023): the x0-space weight min(snr, gamma),
  expressed for the quantity the model predicts."""
  clipped = jnp.minimum(snr_B, gamma)
  if prediction_type == "epsilon":
    return clipped / snr_B
  if prediction_type == "v_prediction":
    return clipped / (snr_B + 1.0)
  if prediction_type == "sample":
    return clipped
  raise ValueError(f"min-SNR weighting: unknown prediction_type {prediction_type!r}")


def denoising_loss(models, batch, empty, key, spec: StepSpec):
  """The denoising objective with this step's randomness drawn from `key`."""
  k_latent, k_noise, k_t, k_drop = jax.random.split(key, 4)
  x0 = clean_latents(models, batch, k_latent, spec)
  B = x0.shape[0]
  drop_image_B, drop_text_B = drop_masks(k_drop, B, spec)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  t_B = jax.random.randint(k_t, (B,), 0, spec.schedule.num_train_timesteps)
  return denoising_error(models, batch, empty, x0, noise, t_B, drop_image_B, drop_text_B, spec)


def denoising_error(
  models, batch, empty, x0, noise, t_B, drop_image_B, drop_text_B, spec: StepSpec
):
  """Mean squared error of the noise (or v / x0) prediction, for given draws."""
  context, features, added = conditions(models, batch, empty, drop_image_B, drop_text_B, spec)
  alphas_cumprod = jnp.asarray(spec.schedule.alphas_cumprod())
  x_t = add_noise(alphas_cumprod, x0, noise, t_B)
  pred = models.unet(x_t, t_B, context, image_embeds=features, **added).astype(jnp.float32)
  target = training_target(spec.schedule, alphas_cumprod, x0, noise, t_B)
  per_example = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))
  if spec.snr_gamma > 0:
    snr_B = alphas_cumprod[t_B] / (1.0 - alphas_cumprod[t_B])
    per_example = per_example * min_snr_weight(snr_B, spec.snr_gamma, spec.schedule.prediction_type)
  return jnp.mean(per_example)


def ema_decay_at(step, decay: float):
  """The EMA's decay for the update after `step` earlier updates, as diffusers' EMAModel sets it
  by default: 0 at first (the EMA starts as the trained weights), then (1 + s) / (10 + s)
  capped at `decay`, so a short run's EMA is not dominated by its initial weights."""
  s = jnp.asarray(step, jnp.float32)
  return jnp.where(s <= 0, 0.0, jnp.minimum(decay, (1 + s) / (10 + s)))


def train_step(
  state: TrainState,
  frozen,
  batch,
  empty,
  key,
  *,
  graphdef,
  spec: StepSpec,
  optimizer: optax.GradientTransformation,
):
  """One optimizer step; returns the new state and {loss, grad_norm, param_norm}.

  A non-finite loss, gradient or updated parameter leaves the state unchanged (the loop then
  stops the run), so that no checkpoint can hold one.
  """
  key = jax.random.fold_in(key, state.step)
  loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, graphdef, batch, empty, key, spec)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if spec.ema_decay > 0:
    decay = ema_decay_at(state.step, spec.ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
  grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
  new = TrainState(state.step + 1, params, opt_state, ema)
  new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
  return new, {"loss": loss, "grad_norm": grad_norm, "param_norm": param_norm}
