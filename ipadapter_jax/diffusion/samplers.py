"""The samplers the pipeline runs: DDIM, Euler, Euler ancestral, DPM-Solver++ 2M (with Karras
sigmas), DDPM and UniPC, as diffusers' schedulers compute them.

Each sampler is a frozen (hashable) description built from a scheduler config exactly as
diffusers' `XScheduler.from_config(config)` builds it, behind one interface (`Sampler`):
`tables(n)` computes on the host what a run of n steps needs (the model timesteps, and the sigmas
as diffusers' `set_timesteps` gives them); `init_noise_sigma`, `scale_model_input`, `init_state`
and `advance` are pure functions of traced values and the step index, so a whole run is one loop
in one compiled program. The ancestral samplers (`needs_noise`) take a standard normal `noise`
at every step. A run may start mid-schedule (img2img, inpainting): `add_noise(x0, noise, i,
tables)` gives x at step i as diffusers' `add_noise` does there, `first_step(n, strength)` is the
step diffusers starts from, and `advance(..., start=s)` treats step s as the run's first, as
diffusers does after `set_begin_index(s)`. The Euler samplers work on x = x0 + sigma eps,
DPM-Solver and UniPC on x_t = alpha_t (x0 + sigma eps), DDIM and DDPM on x_t with timesteps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.diffusion.schedule import (
  SPACINGS,
  NoiseSchedule,
  add_noise,
  alpha_bar_at,
  pick_fields,
  predicted_x0,
  predicted_x0_sigma_space,
  spaced_timesteps,
)


class Tables(NamedTuple):
  """A run's per-step values: model timesteps [n] and sigmas [n + 1] (the last one 0; all 0 for
  the samplers that work with timesteps alone)."""

  timesteps: np.ndarray
  sigmas: np.ndarray


class Sampler(Protocol):
  """What the sampling loop asks of a sampler (every class in this module provides it)."""

  schedule: NoiseSchedule
  needs_noise: bool  # fresh standard normal noise at every step

  def tables(self, n: int) -> Tables: ...
  def init_noise_sigma(self, tables: Tables) -> float: ...
  def scale_model_input(self, x, i, tables: Tables): ...
  def init_state(self, x): ...
  def add_noise(self, x0, noise, i, tables: Tables): ...
  def advance(self, out, i, x, state, tables: Tables, *, eta=0.0, noise=None, start=0): ...


def first_step(n: int, strength: float) -> int:
  """The index of the first step an img2img / inpainting run of n steps takes with `strength`
  (diffusers' rule for samplers of order 1: the last int(n * strength) steps run)."""
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength must be in [0.0, 1.0], got {strength}")
  steps = min(int(n * strength), n)
  if steps == 0:
    raise ValueError(f"strength {strength} with {n} steps leaves no denoising step")
  return n - steps


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
  """The fractional training timestep of each sigma: linear interpolation in log sigma."""
  sigma = np.asarray(sigma)
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, None]
  low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high = low + 1
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
  return ((1 - w) * low + w * high).reshape(sigma.shape)


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
  """Karras et al. (2022): n sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho)."""
  ramp = np.linspace(0, 1, n)
  return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _explicit(raw: dict[str, Any]) -> dict[str, Any]:
  """A config without the values its class left at their defaults: diffusers' from_config does
  not carry those over to another scheduler class."""
  defaults = set(raw.get("_use_default_values", ()))
  return {k: v for k, v in raw.items() if k not in defaults}


def _from_config(cls, raw: dict[str, Any], source: str, overrides: dict[str, Any]):
  raw = _explicit(raw)
  for key in (
    "thresholding",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
  ):
    if {**raw, **overrides}.get(key):
      raise ValueError(f"{source}: '{key}'=True is not supported by {cls.__name__}")
  overrides.pop("thresholding", None)
  schedule = NoiseSchedule.from_diffusers(raw, source, **NoiseSchedule.split(overrides))
  fields = pick_fields(cls, raw, overrides)
  if fields.get("timestep_spacing", "leading") not in SPACINGS:
    raise ValueError(
      f"{source}: timestep_spacing={fields['timestep_spacing']!r} is not supported {SPACINGS}"
    )
  return cls(schedule=schedule, **fields)


def _multistep_timesteps(sampler, n: int) -> np.ndarray:
  """The integer timesteps diffusers' multistep solvers (DPM-Solver, UniPC) space n steps on:
  linspace and leading divide T into n + 1 parts and drop the last."""
  return spaced_timesteps(
    sampler.schedule.num_train_timesteps,
    n,
    sampler.timestep_spacing,
    sampler.steps_offset,
    parts=n + 1,
  ).astype(np.int64)


def _alpha_sigma(sigma):
  """(alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t eps from the sigma-space sigma."""
  alpha = 1 / jnp.sqrt(sigma**2 + 1)
  return alpha, sigma * alpha


class _OnXt:
  """The loop interface's defaults, those of samplers on x_t itself: unit initial noise, the
  model input as it is, no state between steps (the Euler samplers, in sigma space, override the
  first two; the multistep ones the last)."""

  def init_noise_sigma(self, tables: Tables) -> float:
    return 1.0

  def scale_model_input(self, x, i, tables: Tables):
    return x

  def init_state(self, x):
    return ()


class _Timestepped(_OnXt):
  """Samplers that step between training timesteps (DDIM, DDPM): no sigmas, and noise added by
  the forward process at the step's timestep."""

  def add_noise(self, x0, noise, i, tables: Tables):
    """x at step i: the forward process at that step's timestep."""
    return add_noise(self.schedule.alphas_cumprod(), x0, noise, tables.timesteps[i])

  def _timestep_tables(self, n: int) -> Tables:
    ts = spaced_timesteps(
      self.schedule.num_train_timesteps, n, self.timestep_spacing, self.steps_offset
    )
    return Tables(ts.astype(np.int32), np.zeros((n + 1,), np.float32))


@dataclasses.dataclass(frozen=True)
class DDIM(_Timestepped):
  """The DDIM sampler (Song et al., 2021) with diffusers' DDIMScheduler semantics; eta > 0 takes
  the step's noise."""

  schedule: NoiseSchedule = NoiseSchedule()
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  timestep_spacing: str = "leading"
  needs_noise = False

  def __post_init__(self):
    if self.timestep_spacing not in SPACINGS:
      raise ValueError(f"timestep_spacing={self.timestep_spacing!r} is not supported {SPACINGS}")

  @classmethod
  def stable_diffusion(cls, **overrides) -> "DDIM":
    """DDIM as Stable Diffusion uses it (docs/reference.md §6)."""
    schedule = NoiseSchedule.stable_diffusion(**NoiseSchedule.split(overrides))
    return cls(
      **{
        "schedule": schedule,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        **overrides,
      }
    )

  @classmethod
  def from_diffusers(
    cls, raw: dict[str, Any], source: str = "scheduler config", **overrides
  ) -> "DDIM":
    """From any diffusers scheduler_config.json (as `DDIMScheduler.from_config` reads it)."""
    return _from_config(cls, raw, source, overrides)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return self.schedule.alphas_cumprod()

  def timesteps(self, num_inference_steps: int) -> np.ndarray:
    """The model timesteps of a `num_inference_steps` run, first (noisiest) to last, int32."""
    return self.tables(num_inference_steps).timesteps

  def tables(self, n: int) -> Tables:
    return self._timestep_tables(n)

  def step(self, model_output, t, x_t, *, num_inference_steps: int, eta=0.0, noise=None):
    """x_t -> x_{t - T/n}. `noise` (standard normal, like x_t) is needed when eta > 0."""
    a_t = alpha_bar_at(self.alphas_cumprod, t, x_t)
    # diffusers steps back by T // n whatever the spacing; below 0 it uses the final alpha.
    t_prev = jnp.asarray(t) - self.schedule.num_train_timesteps // num_inference_steps
    final = 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])
    a_prev = jnp.where(
      t_prev >= 0, alpha_bar_at(self.alphas_cumprod, jnp.maximum(t_prev, 0), x_t), final
    )
    x_t, out = x_t.astype(jnp.float32), model_output.astype(jnp.float32)
    sigma_t, sqrt_a_t = jnp.sqrt(1.0 - a_t), jnp.sqrt(a_t)
    x0_hat = predicted_x0(self.schedule.prediction_type, out, x_t, sqrt_a_t, sigma_t)
    if self.schedule.prediction_type == "epsilon":
      eps_hat = out
    elif self.schedule.prediction_type == "sample":
      eps_hat = (x_t - sqrt_a_t * x0_hat) / sigma_t
    else:  # v_prediction
      eps_hat = sqrt_a_t * out + sigma_t * x_t
    if self.clip_sample:
      x0_hat = jnp.clip(x0_hat, -self.clip_sample_range, self.clip_sample_range)

    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(a_prev) * x0_hat + jnp.sqrt(1.0 - a_prev - std**2) * eps_hat
    if noise is not None:
      x_prev = x_prev + std * noise.astype(jnp.float32)
    return x_prev

  def advance(self, out, i, x, state, tables: Tables, *, eta=0.0, noise=None, start=0):
    n = tables.timesteps.shape[0]
    return self.step(
      out, tables.timesteps[i], x, num_inference_steps=n, eta=eta, noise=noise
    ), state


@dataclasses.dataclass(frozen=True)
class Euler(_OnXt):
  """Euler's method on the probability-flow ODE (diffusers' EulerDiscreteScheduler, s_churn = 0)."""

  schedule: NoiseSchedule = NoiseSchedule()
  timestep_spacing: str = "linspace"
  steps_offset: int = 0
  use_karras_sigmas: bool = False
  interpolation_type: str = "linear"
  final_sigmas_type: str = "zero"
  sigma_min: float | None = None
  sigma_max: float | None = None
  needs_noise = False

  @classmethod
  def from_diffusers(cls, raw: dict[str, Any], source: str = "scheduler config", **overrides):
    if {**raw, **overrides}.get("timestep_type", "discrete") != "discrete":
      raise ValueError(f"{source}: only timestep_type='discrete' is supported")
    overrides.pop("timestep_type", None)
    sampler = _from_config(cls, raw, source, overrides)
    if sampler.schedule.prediction_type == "sample":
      raise ValueError(f"{source}: Euler does not support prediction_type='sample' (as diffusers)")
    return sampler

  def tables(self, n: int) -> Tables:
    ts = spaced_timesteps(
      self.schedule.num_train_timesteps, n, self.timestep_spacing, self.steps_offset, integer=False
    ).astype(np.float32)
    train = self.schedule.train_sigmas()
    log_sigmas = np.log(train)
    if self.interpolation_type == "linear":
      sigmas = np.interp(ts, np.arange(len(train)), train)
    elif self.interpolation_type == "log_linear":
      sigmas = np.exp(np.linspace(np.log(train[-1]), np.log(train[0]), n + 1, dtype=np.float32))
    else:
      raise ValueError(f"interpolation_type={self.interpolation_type!r} is not supported")
    if self.use_karras_sigmas:
      sigmas = karras_sigmas(
        self.sigma_max or float(sigmas[0]), self.sigma_min or float(sigmas[-1]), n
      )
      ts = sigma_to_t(sigmas, log_sigmas)
    last = 0.0 if self.final_sigmas_type == "zero" else float(train[0])
    return Tables(np.asarray(ts, np.float32), np.concatenate([sigmas, [last]]).astype(np.float32))

  def init_noise_sigma(self, tables: Tables) -> float:
    top = float(tables.sigmas.max())
    return top if self.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5

  def scale_model_input(self, x, i, tables: Tables):
    return x / jnp.sqrt(tables.sigmas[i] ** 2 + 1)

  def add_noise(self, x0, noise, i, tables: Tables):
    """x at step i: x0 + sigma_i noise."""
    return x0.astype(jnp.float32) + tables.sigmas[i] * noise.astype(jnp.float32)

  def advance(self, out, i, x, state, tables: Tables, *, eta=0.0, noise=None, start=0):
    """(x at step i + 1, state) from the model output at step i (eta, noise, start: unused)."""
    sigmas = tables.sigmas
    sigma = sigmas[i]
    x, out = x.astype(jnp.float32), out.astype(jnp.float32)
    x0 = predicted_x0_sigma_space(self.schedule.prediction_type, out, x, sigma)
    return x + (x - x0) / sigma * (sigmas[i + 1] - sigma), state


class _Multistep(_OnXt):
  """The multistep solvers on the data prediction (DPM-Solver++, UniPC): x is x_t itself, at the
  sigmas of diffusers' multistep timestep spacing."""

  def add_noise(self, x0, noise, i, tables: Tables):
    """x at step i: alpha_i x0 + sigma_i noise."""
    alpha, sigma = _alpha_sigma(tables.sigmas[i])
    return alpha * x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)

  def _sigma_tables(
    self,
    n: int,
    sigma_max=None,
    sigma_min=None,
    *,
    round_karras: bool = True,
    karras_last: bool = False,
  ) -> Tables:
    """Timesteps and n + 1 sigmas: interpolated at the spaced timesteps, or Karras sigmas
    between `sigma_max` and `sigma_min` (default: the training range) with their timesteps;
    the last sigma 0 ("zero") or the smallest (training or, with `karras_last`, Karras)."""
    ts = _multistep_timesteps(self, n)
    train = self.schedule.train_sigmas()
    last = float(train[0])
    if self.use_karras_sigmas:
      sigmas = karras_sigmas(sigma_max or float(train[-1]), sigma_min or float(train[0]), n)
      ts = sigma_to_t(sigmas, np.log(train))
      ts = ts.round() if round_karras else ts
      last = float(sigmas[-1]) if karras_last else last
    else:
      sigmas = np.interp(ts, np.arange(len(train)), train)
    last = 0.0 if self.final_sigmas_type == "zero" else last
    return Tables(
      np.asarray(ts).astype(np.int64).astype(np.int32),
      np.concatenate([sigmas, [last]]).astype(np.float32),
    )


@dataclasses.dataclass(frozen=True)
class DPMSolverPP(_Multistep):
  """DPM-Solver++ (Lu et al., 2022), multistep, order 2, midpoint (diffusers'
  DPMSolverMultistepScheduler with its defaults); `use_karras_sigmas` gives "DPM++ 2M Karras"."""

  schedule: NoiseSchedule = NoiseSchedule()
  timestep_spacing: str = "linspace"
  steps_offset: int = 0
  use_karras_sigmas: bool = False
  solver_order: int = 2
  algorithm_type: str = "dpmsolver++"
  solver_type: str = "midpoint"
  lower_order_final: bool = True
  euler_at_final: bool = False
  final_sigmas_type: str = "zero"
  lambda_min_clipped: float = -float("inf")
  needs_noise = False

  @classmethod
  def from_diffusers(cls, raw: dict[str, Any], source: str = "scheduler config", **overrides):
    sampler = _from_config(cls, raw, source, overrides)
    if (sampler.solver_order, sampler.algorithm_type, sampler.solver_type) != (
      2,
      "dpmsolver++",
      "midpoint",
    ) or sampler.lambda_min_clipped != -float("inf"):
      raise ValueError(
        f"{source}: only DPM-Solver++ of order 2 with the midpoint solver (and no "
        "lambda_min_clipped) is supported"
      )
    return sampler

  def tables(self, n: int) -> Tables:
    # diffusers keeps the Karras timesteps of a cosine schedule unrounded
    return self._sigma_tables(n, round_karras=self.schedule.beta_schedule != "squaredcos_cap_v2")

  def init_state(self, x):
    return jnp.zeros_like(x, jnp.float32)  # the previous step's x0 estimate

  def advance(self, out, i, x, previous_x0, tables: Tables, *, eta=0.0, noise=None, start=0):
    """One step; the run's first step (`start`), and the last when lower-order finishing
    applies, are first-order (diffusers' rules for `lower_order_final`, `euler_at_final`, zero
    final sigma)."""
    sigmas = tables.sigmas
    n = sigmas.shape[0] - 1
    x, out = x.astype(jnp.float32), out.astype(jnp.float32)
    alpha_s, sigma_s = _alpha_sigma(sigmas[i])
    x0 = predicted_x0(self.schedule.prediction_type, out, x, alpha_s, sigma_s)
    alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
    lam_t = jnp.log(alpha_t) - jnp.log(sigma_t)
    lam_s = jnp.log(alpha_s) - jnp.log(sigma_s)
    h = lam_t - lam_s
    first = (sigma_t / sigma_s) * x - alpha_t * (jnp.exp(-h) - 1.0) * x0
    alpha_p, sigma_p = _alpha_sigma(sigmas[jnp.maximum(i - 1, 0)])
    r0 = (lam_s - (jnp.log(alpha_p) - jnp.log(sigma_p))) / h
    d1 = (x0 - previous_x0) / r0
    second = (
      (sigma_t / sigma_s) * x
      - alpha_t * (jnp.exp(-h) - 1.0) * x0
      - 0.5 * alpha_t * (jnp.exp(-h) - 1.0) * d1
    )
    last = i == n - 1
    low_final = (
      self.euler_at_final
      or (self.lower_order_final and n < 15)
      or (self.final_sigmas_type == "zero")
    )
    use_first = (i == start) | (last & low_final)
    return jnp.where(use_first, first, second), x0


@dataclasses.dataclass(frozen=True)
class EulerAncestral(_OnXt):
  """Euler ancestral (diffusers' EulerAncestralDiscreteScheduler): each step goes down to
  sigma_down deterministically and adds fresh noise of size sigma_up."""

  schedule: NoiseSchedule = NoiseSchedule()
  timestep_spacing: str = "linspace"
  steps_offset: int = 0
  needs_noise = True  # (a class constant, not a field) fresh noise at every step

  @classmethod
  def from_diffusers(cls, raw: dict[str, Any], source: str = "scheduler config", **overrides):
    sampler = _from_config(cls, raw, source, overrides)
    if sampler.schedule.prediction_type == "sample":
      raise ValueError(
        f"{source}: Euler ancestral does not support prediction_type='sample' (as diffusers)"
      )
    return sampler

  def _euler(self) -> Euler:
    return Euler(self.schedule, self.timestep_spacing, self.steps_offset)

  def tables(self, n: int) -> Tables:
    return self._euler().tables(n)

  def init_noise_sigma(self, tables: Tables) -> float:
    return self._euler().init_noise_sigma(tables)

  def scale_model_input(self, x, i, tables: Tables):
    return self._euler().scale_model_input(x, i, tables)

  def add_noise(self, x0, noise, i, tables: Tables):
    return self._euler().add_noise(x0, noise, i, tables)

  def advance(self, out, i, x, state, tables: Tables, *, eta=0.0, noise=None, start=0):
    sigma, sigma_to = tables.sigmas[i], tables.sigmas[i + 1]
    x, out = x.astype(jnp.float32), out.astype(jnp.float32)
    x0 = predicted_x0_sigma_space(self.schedule.prediction_type, out, x, sigma)
    sigma_up = jnp.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
    sigma_down = jnp.sqrt(sigma_to**2 - sigma_up**2)
    x = x + (x - x0) / sigma * (sigma_down - sigma)
    return x + noise.astype(jnp.float32) * sigma_up, state


@dataclasses.dataclass(frozen=True)
class DDPM(_Timestepped):
  """Ancestral DDPM sampling (diffusers' DDPMScheduler, fixed_small variance): each step goes to
  the next timestep of the run through the posterior q(x_prev | x_t, x0_hat), plus its noise."""

  schedule: NoiseSchedule = NoiseSchedule()
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  variance_type: str = "fixed_small"
  needs_noise = True

  @classmethod
  def from_diffusers(cls, raw: dict[str, Any], source: str = "scheduler config", **overrides):
    sampler = _from_config(cls, raw, source, overrides)
    if sampler.variance_type != "fixed_small":
      raise ValueError(
        f"{source}: DDPM with variance_type={sampler.variance_type!r} is not "
        "supported (only 'fixed_small')"
      )
    return sampler

  def tables(self, n: int) -> Tables:
    return self._timestep_tables(n)

  def advance(self, out, i, x, state, tables: Tables, *, eta=0.0, noise=None, start=0):
    ts = tables.timesteps
    alphas = jnp.asarray(self.schedule.alphas_cumprod())
    t = ts[i]
    t_prev = jnp.where(i + 1 < ts.shape[0], ts[jnp.minimum(i + 1, ts.shape[0] - 1)], -1)
    a_t = alphas[t]
    a_prev = jnp.where(t_prev >= 0, alphas[jnp.maximum(t_prev, 0)], 1.0)
    x, out = x.astype(jnp.float32), out.astype(jnp.float32)
    x0 = predicted_x0(self.schedule.prediction_type, out, x, jnp.sqrt(a_t), jnp.sqrt(1 - a_t))
    if self.clip_sample:
      x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
    alpha, beta = a_t / a_prev, 1 - a_t / a_prev
    mean = (jnp.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (
      jnp.sqrt(alpha) * (1 - a_prev) / (1 - a_t)
    ) * x
    variance = jnp.maximum((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    return mean + jnp.where(t > 0, jnp.sqrt(variance), 0.0) * noise.astype(jnp.float32), state


@dataclasses.dataclass(frozen=True)
class UniPC(_Multistep):
  """UniPC (Zhao et al., 2023), the B(h) = e^h - 1 ("bh2") predictor-corrector on the data
  prediction, multistep of order 1 or 2 (diffusers' UniPCMultistepScheduler with its defaults).

  Each step first corrects the sample the previous step predicted, with the model output just
  computed there (UniC), then predicts the next sample (UniP). State: the x0 estimates of the
  two previous steps and the previous step's sample before its predictor."""

  schedule: NoiseSchedule = NoiseSchedule()
  timestep_spacing: str = "linspace"
  steps_offset: int = 0
  use_karras_sigmas: bool = False
  solver_order: int = 2
  solver_type: str = "bh2"
  predict_x0: bool = True
  lower_order_final: bool = True
  disable_corrector: tuple = ()
  final_sigmas_type: str = "zero"
  sigma_min: float | None = None
  sigma_max: float | None = None
  needs_noise = False

  @classmethod
  def from_diffusers(cls, raw: dict[str, Any], source: str = "scheduler config", **overrides):
    merged = {**raw, **overrides}
    for key in ("use_dynamic_shifting", "solver_p", "shift_terminal"):
      if merged.get(key):
        raise ValueError(f"{source}: '{key}' is not supported by UniPC")
    overrides = {
      k: v
      for k, v in overrides.items()
      if k not in ("use_dynamic_shifting", "solver_p", "shift_terminal")
    }
    if merged.get("solver_type") in ("midpoint", "heun", "logrho"):  # diffusers' own mapping
      overrides["solver_type"] = "bh2"
    if merged.get("disable_corrector") is not None:
      overrides["disable_corrector"] = tuple(int(k) for k in merged["disable_corrector"])
    sampler = _from_config(cls, raw, source, overrides)
    if sampler.solver_order not in (1, 2):
      raise ValueError(
        f"{source}: UniPC 'solver_order'={sampler.solver_order} is not supported (1 or 2)"
      )
    if sampler.solver_type != "bh2":
      raise ValueError(
        f"{source}: UniPC 'solver_type'={sampler.solver_type!r} is not supported (only 'bh2')"
      )
    if not sampler.predict_x0:
      raise ValueError(f"{source}: UniPC 'predict_x0'=False is not supported")
    if sampler.final_sigmas_type not in ("zero", "sigma_min"):
      raise ValueError(
        f"{source}: 'final_sigmas_type'={sampler.final_sigmas_type!r} is not supported"
      )
    if (
      sampler.solver_order == 2
      and not sampler.lower_order_final
      and sampler.final_sigmas_type == "zero"
    ):
      raise ValueError(
        f"{source}: UniPC 'lower_order_final'=False with a zero final sigma "
        "divides by zero at the last step (in diffusers too)"
      )
    return sampler

  def tables(self, n: int) -> Tables:
    return self._sigma_tables(n, self.sigma_max, self.sigma_min, karras_last=True)

  def init_state(self, x):
    zeros = jnp.zeros_like(x, jnp.float32)
    return zeros, zeros, zeros  # x0 estimates at steps i - 1 and i - 2, the sample at i - 1

  @staticmethod
  def _lambda(sigma):
    alpha, sigma = _alpha_sigma(sigma)
    return jnp.log(alpha) - jnp.log(sigma)

  def _update(self, x, m0, m1, s, s1, t, second, corrector_d=None):
    """The B(h) update from x at sigma s to sigma t, with the data prediction m0 at s and, for
    the second-order terms, m1 at the sigma s1 before s. Without `corrector_d` this is the
    predictor (rho = 1/2); with it (the new prediction at t minus m0) the corrector, whose
    coefficients solve the order conditions on the nodes s1, t."""
    alpha_t, sigma_t = _alpha_sigma(t)
    _, sigma_s = _alpha_sigma(s)
    lam_s = self._lambda(s)
    h = self._lambda(t) - lam_s
    hh = -h
    phi1 = jnp.expm1(hh)  # h phi_1(h), B(h) as well (bh2)
    r = jnp.where(second, (self._lambda(s1) - lam_s) / h, -1.0)  # -1: unused, kept finite
    d1 = (m1 - m0) / r
    base = sigma_t / sigma_s * x - alpha_t * phi1 * m0
    if corrector_d is None:
      return jnp.where(second, base - alpha_t * phi1 * 0.5 * d1, base)
    phi2 = phi1 / hh - 1
    b0 = phi2 / phi1
    b1 = (phi2 / hh - 0.5) * 2 / phi1
    rho0 = (b0 - b1) / (1 - r)  # [[1, 1], [r, 1]] rho = [b0, b1]
    rho1 = b0 - rho0
    second_order = base - alpha_t * phi1 * (rho0 * d1 + rho1 * corrector_d)
    first_order = base - alpha_t * phi1 * 0.5 * corrector_d
    return jnp.where(second, second_order, first_order)

  def _order2(self, i, start, n):
    """Whether the predictor at step i is second order: not at the run's first step, nor at
    the last under `lower_order_final`."""
    if self.solver_order == 1:
      return jnp.asarray(False)
    ok = i > start
    return ok & (i < n - 1) if self.lower_order_final else ok

  def advance(self, out, i, x, state, tables: Tables, *, eta=0.0, noise=None, start=0):
    """Corrects x (predicted at step i - 1) with this step's model output, unless i is the
    run's first step, then predicts x at step i + 1."""
    m1, m2, last_x = state
    sigmas = tables.sigmas
    n = sigmas.shape[0] - 1
    x, out = x.astype(jnp.float32), out.astype(jnp.float32)
    s = sigmas[i]
    alpha, sigma = _alpha_sigma(s)
    x0 = predicted_x0(self.schedule.prediction_type, out, x, alpha, sigma)
    back1, back2 = sigmas[jnp.maximum(i - 1, 0)], sigmas[jnp.maximum(i - 2, 0)]
    correct = i > start
    for k in self.disable_corrector:
      correct = correct & (i - 1 != k)
    corrected = self._update(
      last_x, m1, m2, back1, back2, s, self._order2(i - 1, start, n), corrector_d=x0 - m1
    )
    x = jnp.where(correct, corrected, x)
    x_next = self._update(x, x0, m1, s, back1, sigmas[i + 1], self._order2(i, start, n))
    return x_next, (x0, m1, x)


# sample.py's --scheduler names -> (class, settings added to the folder's scheduler config).
SAMPLERS = {
  "ddim": (DDIM, {}),
  "euler": (Euler, {}),
  "euler_a": (EulerAncestral, {}),
  "dpmpp_2m": (DPMSolverPP, {}),
  "dpmpp_2m_karras": (DPMSolverPP, {"use_karras_sigmas": True}),
  "ddpm": (DDPM, {}),
  "unipc": (UniPC, {}),
}
_BY_CLASS = {
  "DDIMScheduler": "ddim",
  "EulerDiscreteScheduler": "euler",
  "EulerAncestralDiscreteScheduler": "euler_a",
  "DDPMScheduler": "ddpm",
  "DPMSolverMultistepScheduler": "dpmpp_2m",
  "UniPCMultistepScheduler": "unipc",
}


def default_sampler(config: dict) -> str:
  """The sampler a folder's scheduler config names; DDIM (the paper's sampler) for a scheduler
  this project does not implement (Stable Diffusion 1.5 folders name PNDM)."""
  name = _BY_CLASS.get(config.get("_class_name"), "ddim")
  if name == "dpmpp_2m" and config.get("use_karras_sigmas"):
    return "dpmpp_2m_karras"
  return name


def make_sampler(name: str, config: dict, source: str = "scheduler config") -> Sampler:
  """The sampler `name` built from a scheduler config, as diffusers' `from_config` builds it."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SAMPLERS)}")
  cls, extra = SAMPLERS[name]
  return cls.from_diffusers(dict(config), source, **extra)
