"""The train step's cost and the utilisation it reaches: FLOPs per device per step (XLA's count of
the compiled step, plus the attention inside Pallas kernels, which XLA does not count) times steps
per second, over the chip's dense bfloat16 peak (`ipadapter_jax.chips`).

The count is of what the devices execute: rematerialised activations count again, and a float32
run is measured against the bfloat16 peak too. Where the chip is unknown (a CPU) there is no
utilisation at all rather than one against a made-up peak.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ipadapter_jax import chips
from ipadapter_jax.train.compile_only import MOSAIC_CALL, blocked_attention_flops

# cuDNN's fused attention, a custom call whose FLOPs XLA's count may leave out.
_CUDNN_ATTENTION = "__cudnn$fmha"
# A train step runs about 3 forwards of each attention: the forward and the backward's two
# products per forward product (`compile_only.blocked_attention_flops`).
_TRAIN_OVER_FORWARD = 3


@dataclasses.dataclass(frozen=True)
class StepCost:
  """FLOPs per device per step (None when XLA gives no count), the chip's peak FLOP/s (None when
  unknown), and whether the count leaves out kernels (then utilisation is a lower bound)."""

  flops: float | None
  peak_flops: float | None
  lower_bound: bool = False
  kernel_flops: float = 0.0  # of `flops`: attention inside Pallas kernels, counted analytically

  def utilisation(self, steps_per_second: float) -> float | None:
    """The fraction of the chips' peak the steps reach; None when either figure is unknown."""
    if self.flops is None or self.peak_flops is None:
      return None
    return self.flops * steps_per_second / self.peak_flops


def xla_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled program, per device; None where the backend gives none."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # one entry per program on some JAX versions
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


def step_cost(
  compiled, device_kind: str, *, kernel_attention_flops: Callable[[], float] | None = None
) -> StepCost:
  """The cost of a compiled train step on devices of `device_kind`. When the program holds Mosaic
  (Pallas TPU) kernels, `kernel_attention_flops()` gives the forward FLOPs per device of the
  attention they compute (`compile_only.blocked_attention_flops`), added 3 times; without it, or
  with cuDNN's fused attention, the count is a lower bound."""
  chip = chips.chip_of(device_kind)
  flops = xla_flops(compiled)
  text = compiled.as_text() or ""
  lower_bound, kernel = _CUDNN_ATTENTION in text, 0.0
  if MOSAIC_CALL in text:
    if kernel_attention_flops is None:
      lower_bound = True
    else:
      kernel = _TRAIN_OVER_FORWARD * float(kernel_attention_flops())
  return StepCost(
    flops=None if flops is None else flops + kernel,
    peak_flops=None if chip is None else chip.peak_flops,
    lower_bound=lower_bound,
    kernel_flops=kernel,
  )


def unet_kernel_attention(sd, batch, per_device_batch: int) -> Callable[[], float] | None:
  """For `step_cost`: the forward FLOPs per device of the UNet's self-attention long enough for
  a blocked kernel, at the latent size of `batch` (cached latents, or pixels through the VAE);
  None when the run trains no UNet."""
  if sd.unet is None:
    return None
  if "latent_mean" in batch:
    latent = batch["latent_mean"].shape[1]
  else:
    latent = batch["pixels"].shape[1] // 2 ** (len(sd.vae.config.block_out_channels) - 1)
  return lambda: blocked_attention_flops(sd.unet, latent, per_device_batch)
