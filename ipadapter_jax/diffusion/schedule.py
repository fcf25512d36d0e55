"""The DDPM forward process: the noise schedule, noising, the training target, and the rules
every sampler shares (timestep spacing, the clean-sample estimate, the training sigmas).

Notation: alpha_bar_t is the cumulative product of (1 - beta) (diffusers' `alphas_cumprod`);
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. The model predicts eps, v or x0
(`prediction_type`). In sigma space (the Euler samplers) x = x_t / sqrt(alpha_bar_t) =
x0 + sigma eps with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t).
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
# Stable Diffusion's training schedule (docs/reference.md §5), as a scheduler config.
STABLE_DIFFUSION = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def pick_fields(cls, raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
  """The dataclass `cls`'s fields out of a config dict, with `overrides` on top (which must all
  be fields)."""
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
      raise ValueError(
        f"prediction_type={self.prediction_type!r} is not supported {PREDICTION_TYPES}"
      )

  @classmethod
  def stable_diffusion(cls, **overrides) -> "NoiseSchedule":
    """scaled_linear 0.00085..0.012 over 1000 steps, epsilon prediction (docs/reference.md §5)."""
    return cls(**{**STABLE_DIFFUSION, **overrides})

  @classmethod
  def from_diffusers(
    cls, raw: dict[str, Any], source: str = "scheduler config", **overrides
  ) -> "NoiseSchedule":
    if raw.get("trained_betas") is not None:
      raise ValueError(f"{source}: 'trained_betas' is not supported")
    return cls(**pick_fields(cls, raw, overrides))

  @staticmethod
  def split(overrides: dict[str, Any]) -> dict[str, Any]:
    """Removes the schedule's settings from a sampler's `overrides` and returns them."""
    return {k: overrides.pop(k) for k in list(overrides) if k in SCHEDULE_FIELDS}

  def betas(self) -> np.ndarray:
    T = self.num_train_timesteps
    if self.beta_schedule == "linear":
      betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
    elif self.beta_schedule == "scaled_linear":
      betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=np.float64) ** 2
    else:  # squaredcos_cap_v2: the cosine alpha_bar of improved DDPM, betas capped at 0.999
      alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
      betas = np.array(
        [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
      )
    betas = betas.astype(np.float32)  # diffusers keeps betas in float32
    if self.rescale_betas_zero_snr:
      betas = _zero_terminal_snr(betas)
    return betas

  def alphas_cumprod(self) -> np.ndarray:
    """alpha_bar_t for t = 0..T-1: float32 betas, the product accumulated in float64 (as
    torch.cumprod does for diffusers), then float32."""
    alphas = (1.0 - self.betas()).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)

  def train_sigmas(self) -> np.ndarray:
    """sigma_t for t = 0..T-1 in float32, as diffusers computes it from float32 alphas_cumprod
    (a zero terminal SNR schedule's last alpha_bar is 2^-24 there, so that sigma stays finite)."""
    a = self.alphas_cumprod()
    if self.rescale_betas_zero_snr:
      a[-1] = 2.0**-24
    return (((1 - a) / a) ** 0.5).astype(np.float32)


SCHEDULE_FIELDS = frozenset(f.name for f in dataclasses.fields(NoiseSchedule))


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescales betas so that alpha_bar at the last step is exactly 0 (Lin et al., 2023)."""
  sqrt_ab = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  alpha_bar = sqrt_ab**2
  alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
  return (1.0 - alphas).astype(np.float32)


def spaced_timesteps(
  T: int,
  n: int,
  spacing: str,
  steps_offset: int = 0,
  *,
  parts: int | None = None,
  integer: bool = True,
) -> np.ndarray:
  """The training timesteps of an n-step run, noisiest first (float64), by diffusers' spacing
  rules. `parts`: how many parts linspace and leading divide T into (n; the multistep solvers
  use n + 1 and keep the first n); `integer=False` leaves linspace's values unrounded (the Euler
  samplers interpolate their sigmas there)."""
  if spacing not in SPACINGS:
    raise ValueError(f"timestep_spacing={spacing!r} is not supported {SPACINGS}")
  if not 1 <= n <= T:
    raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
  parts = parts or n
  if spacing == "linspace":
    ts = np.linspace(0, T - 1, parts)[::-1][:n]
    return ts.round() if integer else ts
  if spacing == "leading":
    return (np.arange(0, parts) * (T // parts)).round()[::-1][:n] + steps_offset
  return np.round(np.arange(T, 0, -T / n)) - 1


def alpha_bar_at(alphas_cumprod, t, like):
  """alpha_bar_t for integer timesteps t [B] (or a scalar), shaped to broadcast against `like`."""
  a = jnp.asarray(alphas_cumprod)[jnp.asarray(t)]
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)).astype(jnp.float32)


def add_noise(alphas_cumprod, x0, eps, t):
  """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, in float32."""
  a = alpha_bar_at(alphas_cumprod, t, x0)
  return jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * eps.astype(jnp.float32)


def velocity(alphas_cumprod, x0, eps, t):
  """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (the v-prediction target)."""
  a = alpha_bar_at(alphas_cumprod, t, x0)
  return jnp.sqrt(a) * eps.astype(jnp.float32) - jnp.sqrt(1.0 - a) * x0.astype(jnp.float32)


def training_target(schedule: NoiseSchedule, alphas_cumprod, x0, eps, t):
  """What the model learns to predict at (x_t, t) under `schedule.prediction_type`."""
  if schedule.prediction_type == "epsilon":
    return eps.astype(jnp.float32)
  if schedule.prediction_type == "v_prediction":
    return velocity(alphas_cumprod, x0, eps, t)
  return x0.astype(jnp.float32)


def predicted_x0(prediction_type: str, output, x_t, alpha, sigma):
  """The clean-sample estimate from the model's output at x_t = alpha x0 + sigma eps (alpha and
  sigma: sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t)). Works on numpy and jax arrays alike."""
  if prediction_type == "epsilon":
    return (x_t - sigma * output) / alpha
  if prediction_type == "v_prediction":
    return alpha * x_t - sigma * output
  if prediction_type == "sample":
    return output
  raise ValueError(f"unknown prediction_type {prediction_type!r}")


def predicted_x0_sigma_space(prediction_type: str, output, x, sigma):
  """The same estimate in sigma space (x = x0 + sigma eps), in the operation order diffusers'
  Euler schedulers use, so their results agree to the last bits."""
  if prediction_type == "epsilon":
    return x - sigma * output
  if prediction_type == "v_prediction":
    return output * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
  return output
