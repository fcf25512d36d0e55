"""Old import path of the noise schedule and DDIM: they live in `ipadapter_jax.diffusion` now.
This module re-exports them for one release."""

from ipadapter_jax.diffusion.samplers import DDIM
from ipadapter_jax.diffusion.schedule import (BETA_SCHEDULES, PREDICTION_TYPES, SPACINGS,
                                              NoiseSchedule, add_noise, training_target, velocity)

__all__ = ["BETA_SCHEDULES", "PREDICTION_TYPES", "SPACINGS", "DDIM", "NoiseSchedule",
           "add_noise", "training_target", "velocity"]
