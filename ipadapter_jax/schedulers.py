"""The DDPM noise schedule, the forward process and the DDIM sampler, as pure functions.

Notation: alpha_bar_t is the cumulative product of (1 - beta) (diffusers' `alphas_cumprod`);
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. The model predicts eps, v or x0
(`prediction_type`); eps_hat and x0_hat are the estimates a sampler step derives from it.
Defaults are diffusers' class defaults, so `X.from_diffusers(cfg)` behaves as diffusers does on
the same scheduler_config.json; `stable_diffusion()` gives the schedule Stable Diffusion uses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def _pick(cls, raw: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown setting '{unknown[0]}' (known: {sorted(names)})")
  return {**{k: v for k, v in raw.items() if k in names}, **overrides}


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """The DDPM forward process: betas over `num_train_timesteps` steps."""
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  prediction_type: str = "epsilon"
  rescale_betas_zero_snr: bool = False

  def __post_init__(self):
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"beta_schedule={self.beta_schedule!r} is not supported {BETA_SCHEDULES}")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type={self.prediction_type!r} is not supported "
                       f"{PREDICTION_TYPES}")

  @classmethod
  def stable_diffusion(cls, **overrides) -> "NoiseSchedule":
    """scaled_linear 0.00085..0.012 over 1000 steps, epsilon prediction (docs/reference.md §5)."""
    return cls(**{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  **overrides})

  @classmethod
  def from_diffusers(cls, raw: dict[str, Any], source: str = "scheduler config",
                     **overrides) -> "NoiseSchedule":
    if raw.get("trained_betas") is not None:
      raise ValueError(f"{source}: 'trained_betas' is not supported")
    return cls(**_pick(cls, raw, overrides, source))

  def betas(self) -> np.ndarray:
    T = self.num_train_timesteps
    if self.beta_schedule == "linear":
      betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
    elif self.beta_schedule == "scaled_linear":
      betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=np.float64) ** 2
    else:  # squaredcos_cap_v2: the cosine alpha_bar of improved DDPM, betas capped at 0.999
      alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
      betas = np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)
                        for i in range(T)])
    betas = betas.astype(np.float32)  # diffusers keeps betas in float32
    if self.rescale_betas_zero_snr:
      betas = _zero_terminal_snr(betas)
    return betas

  def alphas_cumprod(self) -> np.ndarray:
    """alpha_bar_t for t = 0..T-1: float32 betas, the product accumulated in float64 (as
    torch.cumprod does for diffusers), then float32."""
    alphas = (1.0 - self.betas()).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescales betas so that alpha_bar at the last step is exactly 0 (Lin et al., 2023)."""
  sqrt_ab = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  alpha_bar = sqrt_ab ** 2
  alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
  return (1.0 - alphas).astype(np.float32)


def _gather(alphas_cumprod, t, like):
  """alpha_bar_t for integer timesteps t [B] (or a scalar), shaped to broadcast against `like`."""
  a = jnp.asarray(alphas_cumprod)[jnp.asarray(t)]
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)).astype(jnp.float32)


def add_noise(alphas_cumprod, x0, eps, t):
  """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, in float32."""
  a = _gather(alphas_cumprod, t, x0)
  return jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * eps.astype(jnp.float32)


def velocity(alphas_cumprod, x0, eps, t):
  """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (the v-prediction target)."""
  a = _gather(alphas_cumprod, t, x0)
  return jnp.sqrt(a) * eps.astype(jnp.float32) - jnp.sqrt(1.0 - a) * x0.astype(jnp.float32)


def training_target(schedule: NoiseSchedule, alphas_cumprod, x0, eps, t):
  """What the model learns to predict at (x_t, t) under `schedule.prediction_type`."""
  if schedule.prediction_type == "epsilon":
    return eps.astype(jnp.float32)
  if schedule.prediction_type == "v_prediction":
    return velocity(alphas_cumprod, x0, eps, t)
  return x0.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class DDIM:
  """The DDIM sampler (Song et al., 2021) with diffusers' DDIMScheduler semantics."""
  schedule: NoiseSchedule = NoiseSchedule()
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  timestep_spacing: str = "leading"

  def __post_init__(self):
    if self.timestep_spacing not in SPACINGS:
      raise ValueError(f"timestep_spacing={self.timestep_spacing!r} is not supported {SPACINGS}")

  @classmethod
  def stable_diffusion(cls, **overrides) -> "DDIM":
    """DDIM as Stable Diffusion uses it (docs/reference.md §6)."""
    schedule = NoiseSchedule.stable_diffusion(
        **{k: overrides.pop(k) for k in list(overrides) if k in _SCHEDULE_FIELDS})
    return cls(**{"schedule": schedule, "clip_sample": False, "set_alpha_to_one": False,
                  "steps_offset": 1, **overrides})

  @classmethod
  def from_diffusers(cls, raw: dict[str, Any], source: str = "scheduler config",
                     **overrides) -> "DDIM":
    """From any diffusers scheduler_config.json (as `DDIMScheduler.from_config` reads it)."""
    if raw.get("thresholding") or overrides.get("thresholding"):
      raise ValueError(f"{source}: 'thresholding'=True is not supported")
    overrides.pop("thresholding", None)
    schedule_overrides = {k: overrides.pop(k) for k in list(overrides) if k in _SCHEDULE_FIELDS}
    schedule = NoiseSchedule.from_diffusers(raw, source, **schedule_overrides)
    return cls(schedule=schedule, **_pick(cls, raw, overrides, source))

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return self.schedule.alphas_cumprod()

  def timesteps(self, num_inference_steps: int) -> np.ndarray:
    """The model timesteps of a `num_inference_steps` run, first (noisiest) to last, int32."""
    T, n = self.schedule.num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
      raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
    if self.timestep_spacing == "linspace":
      ts = np.linspace(0, T - 1, n).round()[::-1]
    elif self.timestep_spacing == "leading":
      ts = (np.arange(0, n) * (T // n)).round()[::-1] + self.steps_offset
    else:
      ts = np.round(np.arange(T, 0, -T / n)) - 1
    return ts.astype(np.int32)

  def step(self, model_output, t, x_t, *, num_inference_steps: int, eta=0.0, noise=None):
    """x_t -> x_{t - T/n}. `noise` (standard normal, like x_t) is needed when eta > 0."""
    a_t = _gather(self.alphas_cumprod, t, x_t)
    # diffusers steps back by T // n whatever the spacing; below 0 it uses the final alpha.
    t_prev = jnp.asarray(t) - self.schedule.num_train_timesteps // num_inference_steps
    final = 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])
    a_prev = jnp.where(t_prev >= 0, _gather(self.alphas_cumprod, jnp.maximum(t_prev, 0), x_t), final)
    x_t, out = x_t.astype(jnp.float32), model_output.astype(jnp.float32)
    sigma_t, sqrt_a_t = jnp.sqrt(1.0 - a_t), jnp.sqrt(a_t)

    kind = self.schedule.prediction_type
    if kind == "epsilon":
      x0_hat, eps_hat = (x_t - sigma_t * out) / sqrt_a_t, out
    elif kind == "sample":
      x0_hat = out
      eps_hat = (x_t - sqrt_a_t * x0_hat) / sigma_t
    else:  # v_prediction
      x0_hat, eps_hat = sqrt_a_t * x_t - sigma_t * out, sqrt_a_t * out + sigma_t * x_t
    if self.clip_sample:
      x0_hat = jnp.clip(x0_hat, -self.clip_sample_range, self.clip_sample_range)

    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(a_prev) * x0_hat + jnp.sqrt(1.0 - a_prev - std ** 2) * eps_hat
    if noise is not None:
      x_prev = x_prev + std * noise.astype(jnp.float32)
    return x_prev


_SCHEDULE_FIELDS = {f.name for f in dataclasses.fields(NoiseSchedule)}

