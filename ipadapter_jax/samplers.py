"""Old import path of the samplers: they live in `ipadapter_jax.diffusion.samplers` now. This
module re-exports them for one release; `DDIMSampler` is `DDIM`, which is a sampler itself."""

from ipadapter_jax.diffusion.samplers import (DDIM, DDPM, SAMPLERS, DPMSolverPP, Euler,
                                              EulerAncestral, Sampler, Tables, UniPC,
                                              default_sampler, first_step, karras_sigmas,
                                              make_sampler, sigma_to_t)

DDIMSampler = DDIM

__all__ = ["DDIM", "DDIMSampler", "DDPM", "SAMPLERS", "DPMSolverPP", "Euler", "EulerAncestral",
           "Sampler", "Tables", "UniPC", "default_sampler", "first_step", "karras_sigmas",
           "make_sampler", "sigma_to_t"]
