"""IP-Adapter (image-prompt adapters for Stable Diffusion) in JAX and Flax NNX."""

__version__ = "0.2.0"
