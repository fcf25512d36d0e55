"""Diffusion maths: the noise schedule and the forward process (`schedule`), and the samplers the
sampling loop runs (`samplers`)."""

from ipadapter_jax.diffusion.samplers import (
  DDIM,
  DDPM,
  SAMPLERS,
  DPMSolverPP,
  Euler,
  EulerAncestral,
  Sampler,
  Tables,
  UniPC,
  default_sampler,
  first_step,
  make_sampler,
)
from ipadapter_jax.diffusion.schedule import (
  NoiseSchedule,
  add_noise,
  predicted_x0,
  training_target,
  velocity,
)

__all__ = [
  "DDIM",
  "DDPM",
  "SAMPLERS",
  "DPMSolverPP",
  "Euler",
  "EulerAncestral",
  "Sampler",
  "Tables",
  "UniPC",
  "default_sampler",
  "first_step",
  "make_sampler",
  "NoiseSchedule",
  "add_noise",
  "predicted_x0",
  "training_target",
  "velocity",
]
