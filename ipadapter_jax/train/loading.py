"""The models a run trains and conditions on, loaded as its config says, and what the train step
derives from them (its static spec, the encodings of dropped conditions)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.data.cache import load_empty_text
from ipadapter_jax.diffusion.schedule import NoiseSchedule
from ipadapter_jax.generation.conditioning import null_image_features
from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.vae import VAEConfig
from ipadapter_jax.preprocessing import CLIPImageConfig
from ipadapter_jax.tokenizer import load_tokenizer, tokenize
from ipadapter_jax.train.checks import TrainingError
from ipadapter_jax.train.step import StepSpec
from ipadapter_jax.weights import (
  StableDiffusion,
  load_clip_text,
  load_clip_vision,
  load_stable_diffusion,
)
from ipadapter_jax.weights.diffusers import diffusers_patterns, load_vae
from ipadapter_jax.weights.folders import local_path
from ipadapter_jax.weights.transformers import clip_patterns

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtypes(m) -> dict:
  return dict(dtype=DTYPES[m.compute_dtype], param_dtype=DTYPES[m.frozen_dtype])


def load_clip_towers(cfg) -> StableDiffusion:
  """The contrastive stage's models: both towers of a CLIPModel folder (`model.pretrained`), with
  its tokenizer and image settings, in a StableDiffusion bundle without UNet."""
  folder = local_path(
    cfg.model.pretrained,
    revision=cfg.model.revision or None,
    allow_patterns=clip_patterns(tokenizer=True),
  )
  return StableDiffusion(
    unet=None,
    vae=None,
    text_encoder=load_clip_text(folder, with_projection=True, **_dtypes(cfg.model)),
    tokenizer=load_tokenizer(folder),
    scheduler_config={},
    image_encoder=load_clip_vision(folder, **_dtypes(cfg.model)),
    image_processor=CLIPImageConfig.from_folder(folder),
  )


def load_vae_alone(cfg) -> StableDiffusion:
  """The VAE stage's model: an AutoencoderKL folder (`model.pretrained`), alone in a
  StableDiffusion bundle (no UNet, no text: the VAE trains on pixels only)."""
  folder = local_path(
    cfg.model.pretrained,
    revision=cfg.model.revision or None,
    allow_patterns=diffusers_patterns(None, "vae"),
  )
  return StableDiffusion(
    unet=None,
    vae=load_vae(folder, **_dtypes(cfg.model)),
    text_encoder=None,
    tokenizer=None,
    scheduler_config={},
  )


def _adapter_config(m, image_encoder) -> AdapterConfig:
  a = m.adapter
  embed_dim = (
    image_encoder.config.projection_dim if a.kind == "basic" else image_encoder.config.hidden_size
  )
  return AdapterConfig(
    num_tokens=a.num_tokens,
    embed_dim=embed_dim,
    kind=a.kind,
    resampler_dim=a.resampler_dim or None,
    resampler_depth=a.resampler_depth,
    resampler_heads=a.resampler_heads or None,
    attention=a.attention,
  )


def load_models(cfg) -> StableDiffusion:
  """The frozen models plus the UNet with its (trainable) adapter, as a StableDiffusion bundle."""
  m = cfg.model
  if m.trainable == "clip":
    return load_clip_towers(cfg)
  if m.trainable == "vae":
    return load_vae_alone(cfg)
  image_encoder = image_processor = adapter = None
  if m.trainable in ("adapter", "all"):
    if not m.image_encoder:
      raise TrainingError("training an adapter needs model.image_encoder")
    encoder_dir = local_path(m.image_encoder, allow_patterns=clip_patterns())
    image_encoder = load_clip_vision(encoder_dir, **_dtypes(m))
    image_processor = CLIPImageConfig.from_folder(encoder_dir)
    adapter = _adapter_config(m, image_encoder)
  sd = load_stable_diffusion(
    m.pretrained,
    adapter=None if m.init_adapter else adapter,
    ip_adapter=m.init_adapter or None,
    variant=m.variant or None,
    revision=m.revision or None,
    seed=cfg.seed,
    attention_implementation=m.attention_implementation or None,
    **_dtypes(m),
  )
  if m.init_adapter:
    loaded = sd.unet.adapter_config
    for field in ("kind", "num_tokens", "embed_dim"):
      if getattr(loaded, field) != getattr(adapter, field):
        raise TrainingError(
          f"model.init_adapter {m.init_adapter} has {field}="
          f"{getattr(loaded, field)!r}, the config asks for "
          f"{getattr(adapter, field)!r}"
        )
  sd.image_encoder, sd.image_processor = image_encoder, image_processor
  sd.unet.remat = m.remat
  if cfg.noise.prediction_type:  # what the model learns is what its samplers must read
    sd.scheduler_config = {**sd.scheduler_config, "prediction_type": cfg.noise.prediction_type}
  return sd


def step_spec(cfg, sd: StableDiffusion, *, cached: bool) -> StepSpec:
  """The train step's static choices for these models and data (`cached`: an embedding cache)."""
  if sd.unet is None:  # the CLIP towers or the VAE
    return StepSpec(
      schedule=None,
      image_features=None,
      drop_image=0.0,
      drop_text=0.0,
      drop_both=0.0,
      cached=False,
      latents=None,
      ema_decay=cfg.optimizer.ema_decay,
      objective="autoencode" if sd.vae is not None else "contrastive",
      temperature=cfg.contrastive_temperature,
      kl_weight=cfg.vae_kl_weight,
    )
  return denoising_spec(
    cfg,
    sd.scheduler_config,
    sd.unet.adapter_config,
    None if sd.vae is None else sd.vae.config,
    cached=cached,
  )


def denoising_spec(
  cfg,
  scheduler_config: dict,
  adapter: AdapterConfig | None,
  latents: VAEConfig | None,
  *,
  cached: bool,
) -> StepSpec:
  """A denoising step's static choices from a run config: its noise schedule (the model's
  scheduler config, unless the run overrides the prediction type), condition dropout, loss
  weighting and EMA. The loop, the compile-only programs and the speed benchmark all take it."""
  overrides = {"prediction_type": cfg.noise.prediction_type} if cfg.noise.prediction_type else {}
  return StepSpec(
    schedule=NoiseSchedule.from_diffusers(scheduler_config, **overrides),
    image_features=None if adapter is None else adapter.image_features,
    drop_image=cfg.dropout.image,
    drop_text=cfg.dropout.text,
    drop_both=cfg.dropout.both,
    cached=cached,
    latents=latents,
    snr_gamma=cfg.noise.snr_gamma,
    ema_decay=cfg.optimizer.ema_decay,
  )


def empty_conditions(cfg, sd: StableDiffusion, spec: StepSpec) -> dict:
  """What a dropped caption / image becomes (docs/reference.md §5), computed once per run."""
  empty = {}
  if spec.objective == "autoencode":  # pixels only: nothing is dropped
    return empty
  if spec.cached:
    empty.update({k: np.asarray(v) for k, v in load_empty_text(cfg.data.source).items()})
    if spec.image_features is not None:
      empty["image_features"] = np.asarray(
        null_image_features(sd.image_encoder, spec.image_features), np.float32
      )
  else:
    empty["input_ids"] = tokenize(sd.tokenizer, [""])
    if sd.tokenizer_2 is not None:
      empty["input_ids_2"] = tokenize(sd.tokenizer_2, [""])
  return empty
