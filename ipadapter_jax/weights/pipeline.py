"""Old name of `ipadapter_jax.weights.stable_diffusion` (whole Stable Diffusion folders), kept as a
re-export for one release."""

from ipadapter_jax.weights.stable_diffusion import (StableDiffusion, load_stable_diffusion,
                                                    save_stable_diffusion)

__all__ = ["StableDiffusion", "load_stable_diffusion", "save_stable_diffusion"]
