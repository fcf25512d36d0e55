"""The train state, the optimizer and the train step (a pure function, jitted once by the loop).

The models travel as one NNX graph (unet, vae, text_encoder, text_encoder_2, image_encoder), split
into the trainable weights (inside the UNet: the adapter, the UNet, or both; or the two CLIP
towers) and everything frozen. Only the trainable part is differentiated, updated, checkpointed.
Two objectives: denoising (the UNet, the adapter) and CLIP's contrastive loss (the CLIP towers,
which the toy world trains from scratch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.vae import sample_posterior
from ipadapter_jax.pipeline import encode_text
from ipadapter_jax.schedulers import NoiseSchedule, add_noise, training_target

TRAINABLE = ("adapter", "unet", "all", "clip")
UNET, TEXT_ENCODER, IMAGE_ENCODER = 0, 2, 4  # positions in the models tuple


def trainable_filter(trainable: str):
  """An NNX filter over the (unet, vae, te, te2, image_encoder) graph selecting what trains."""
  if trainable not in TRAINABLE:
    raise ValueError(f"model.trainable must be one of {TRAINABLE}, got {trainable!r}")
  if trainable == "adapter":
    return AdapterParam
  if trainable == "clip":
    return nnx.All(nnx.Param, lambda path, _: bool(path) and path[0] in (TEXT_ENCODER,
                                                                         IMAGE_ENCODER))
  in_unet = lambda path, _: bool(path) and path[0] == UNET
  if trainable == "unet":
    return nnx.All(nnx.Param, nnx.Not(AdapterParam), in_unet)
  return nnx.All(nnx.Param, in_unet)


class TrainState(NamedTuple):
  step: jax.Array
  params: Any      # the trainable nnx.State
  opt_state: Any
  ema: Any         # an EMA of params, or None


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
        [cfg.warmup_steps])
  return schedule


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  """AdamW with the configured schedule, clipping and gradient accumulation."""
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  chain.append(optax.adamw(make_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  tx = optax.chain(*chain)
  if cfg.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps)
  return tx


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static choices of a train step."""
  schedule: NoiseSchedule | None  # None for the contrastive objective
  image_features: str | None    # "image_embeds", "hidden_states" (plus/full_face) or None
  drop_image: float
  drop_text: float
  drop_both: float
  cached: bool                  # batches hold encoder outputs (data.cache), not pixels/ids
  scaling_factor: float | None  # VAE latent scale; None for a pixel-space model
  snr_gamma: float = 0.0
  ema_decay: float = 0.0
  objective: str = "denoise"    # or "contrastive" (the CLIP towers)
  temperature: float = 0.07     # contrastive: the fixed softmax temperature


def _drop_masks(key, batch_size: int, spec: StepSpec):
  """One uniform draw per example: image-only, text-only or both dropped (REFERENCE §5)."""
  r = jax.random.uniform(key, (batch_size,))
  image_only = r < spec.drop_image
  text_only = (r >= spec.drop_image) & (r < spec.drop_image + spec.drop_text)
  both = ((r >= spec.drop_image + spec.drop_text)
          & (r < spec.drop_image + spec.drop_text + spec.drop_both))
  return image_only | both, text_only | both


def _where_batch(mask_B, a, b):
  """Per example: a where mask_B, else b (a may lack the batch axis: one value for all)."""
  return jnp.where(mask_B.reshape((-1,) + (1,) * (max(a.ndim, b.ndim) - 1)), a, b)


def _conditions(models, batch, empty, drop_image_B, drop_text_B, spec: StepSpec):
  """(context, image features, SDXL added conditions) after condition dropout."""
  unet, _, text_encoder, text_encoder_2, image_encoder = models
  added = {}
  if spec.cached:
    context = _where_batch(drop_text_B, empty["text_context"], batch["text_context"])
    if "text_pooled" in batch:
      added = dict(text_embeds=_where_batch(drop_text_B, empty["text_pooled"],
                                            batch["text_pooled"]),
                   time_ids=batch["time_ids"])
  else:
    ids = _where_batch(drop_text_B, empty["input_ids"], batch["input_ids"])
    ids_2 = (None if text_encoder_2 is None else
             _where_batch(drop_text_B, empty["input_ids_2"], batch["input_ids_2"]))
    context, pooled = encode_text(text_encoder, text_encoder_2, ids, ids_2)
    if pooled is not None:
      added = dict(text_embeds=pooled, time_ids=batch["time_ids"])

  features = None
  if spec.image_features == "image_embeds":  # a dropped image is a zero embedding
    embeds = batch["image_embeds"] if spec.cached else image_encoder(batch["clip_pixels"]).image_embeds
    features = _where_batch(drop_image_B, jnp.zeros_like(embeds), embeds)
  elif spec.image_features == "hidden_states":  # a dropped image is all-zero normalised pixels
    if spec.cached:
      features = _where_batch(drop_image_B, empty["image_hidden_states"][None],
                              batch["image_hidden_states"])
    else:
      pixels = _where_batch(drop_image_B, jnp.zeros_like(batch["clip_pixels"]), batch["clip_pixels"])
      features = image_encoder(pixels).hidden_states[-2]
  return jax.lax.stop_gradient(context), features, added


def _clean_latents(models, batch, key, spec: StepSpec):
  vae = models[1]
  if spec.scaling_factor is None:  # pixel space
    return batch["pixels"].astype(jnp.float32)
  if spec.cached:
    mean, logvar = batch["latent_mean"], batch["latent_logvar"]
  else:
    mean, logvar = vae.encode(batch["pixels"])
  return jax.lax.stop_gradient(sample_posterior(mean, logvar, key) * spec.scaling_factor)


def loss_fn(params, frozen, graphdef, batch, empty, key, spec: StepSpec):
  """The step's objective, in float32."""
  models = nnx.merge(graphdef, params, frozen)
  if spec.objective == "contrastive":
    return contrastive_loss(models, batch, spec.temperature)
  return denoising_loss(models, batch, empty, key, spec)


def _unit(x):
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def contrastive_loss(models, batch, temperature: float):
  """CLIP's symmetric cross-entropy over the batch's image-caption similarities. Examples with
  identical token ids are positives of each other (small vocabularies repeat captions)."""
  text_encoder, image_encoder = models[TEXT_ENCODER], models[IMAGE_ENCODER]
  ids = batch["input_ids"]
  text = _unit(text_encoder(ids).text_embeds)
  image = _unit(image_encoder(batch["clip_pixels"]).image_embeds)
  logits = image @ text.T / temperature
  same = jnp.all(ids[:, None] == ids[None], axis=-1).astype(jnp.float32)  # symmetric
  targets = same / jnp.sum(same, axis=-1, keepdims=True)
  return 0.5 * (jnp.mean(optax.softmax_cross_entropy(logits, targets))
                + jnp.mean(optax.softmax_cross_entropy(logits.T, targets)))


def denoising_loss(models, batch, empty, key, spec: StepSpec):
  """Mean squared error of the noise (or v / x0) prediction."""
  unet = models[UNET]
  k_latent, k_noise, k_t, k_drop = jax.random.split(key, 4)
  x0 = _clean_latents(models, batch, k_latent, spec)
  B = x0.shape[0]
  drop_image_B, drop_text_B = _drop_masks(k_drop, B, spec)
  context, features, added = _conditions(models, batch, empty, drop_image_B, drop_text_B, spec)
  eps = jax.random.normal(k_noise, x0.shape, jnp.float32)
  t = jax.random.randint(k_t, (B,), 0, spec.schedule.num_train_timesteps)
  alphas_cumprod = jnp.asarray(spec.schedule.alphas_cumprod())
  x_t = add_noise(alphas_cumprod, x0, eps, t)
  pred = unet(x_t, t, context, image_embeds=features, **added).astype(jnp.float32)
  target = training_target(spec.schedule, alphas_cumprod, x0, eps, t)
  per_example = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))
  if spec.snr_gamma > 0:  # min-SNR weighting
    snr = alphas_cumprod[t] / (1.0 - alphas_cumprod[t])
    weight = jnp.minimum(snr, spec.snr_gamma) / (
        snr + 1.0 if spec.schedule.prediction_type == "v_prediction" else snr)
    per_example = per_example * weight
  return jnp.mean(per_example)


def train_step(state: TrainState, frozen, batch, empty, key, *, graphdef, spec: StepSpec,
               optimizer: optax.GradientTransformation):
  """One optimizer step; returns the new state and {loss, grad_norm}.

  A non-finite loss leaves the state unchanged (the loop then stops the run).
  """
  key = jax.random.fold_in(key, state.step)
  loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, graphdef, batch, empty, key, spec)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if spec.ema_decay > 0:
    ema = jax.tree.map(lambda e, p: spec.ema_decay * e + (1 - spec.ema_decay) * p, ema, params)
  finite = jnp.isfinite(loss)
  new = TrainState(state.step + 1, params, opt_state, ema)
  new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
  return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}
