"""The networks of one Stable Diffusion model, by name, as a single NNX graph."""

from __future__ import annotations

from flax import nnx


class Networks(nnx.Module):
  """UNet, VAE, text encoder(s), image encoder, the adapters used beside the UNet's own, and
  the structure-control networks (ControlNets, a T2I-Adapter); any may be None or empty.

  Training, the embedding cache, sampling and the benchmarks split and merge this one structure,
  so a weight's path starts with the network's name ("unet", "text_encoder", ...).
  """

  def __init__(
    self,
    *,
    unet=None,
    vae=None,
    text_encoder=None,
    text_encoder_2=None,
    image_encoder=None,
    extra_adapters=(),
    controlnets=(),
    t2i_adapter=None,
  ):
    self.unet = unet
    self.vae = vae
    self.text_encoder = text_encoder
    self.text_encoder_2 = text_encoder_2
    self.image_encoder = image_encoder
    self.extra_adapters = nnx.List(extra_adapters)
    self.controlnets = nnx.List(controlnets)  # structure control: their residuals are summed
    self.t2i_adapter = t2i_adapter

  def adapters(self) -> list:
    """Every adapter in use, in load order: the UNet's own first, then `extra_adapters` (each
    has `adapter_config` and `encode_image_prompt`)."""
    own = [] if self.unet is None or self.unet.image_proj is None else [self.unet]
    return own + list(self.extra_adapters)
