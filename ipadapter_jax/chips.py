"""Accelerator figures (vendors' published numbers) for roofline estimates and utilisation."""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_flops: float  # dense bfloat16 FLOP/s
  memory: float  # bytes of HBM
  bandwidth: float  # HBM bytes/s


CHIPS = {
  "v4": Chip(275e12, 32 * GIB, 1228e9),
  "v5e": Chip(197e12, 16 * GIB, 819e9),
  "v5p": Chip(459e12, 95 * GIB, 2765e9),
  "v6e": Chip(918e12, 32 * GIB, 1640e9),
  "a100": Chip(312e12, 80 * GIB, 2039e9),
  "h100": Chip(989e12, 80 * GIB, 3350e9),
  "h200": Chip(989e12, 141 * GIB, 4800e9),
}

# jax.Device.device_kind -> CHIPS key (TPU kinds name the chip generation, GPUs the product).
_KINDS = (
  ("tpu v5 lite", "v5e"),
  ("tpu v5e", "v5e"),
  ("tpu v5p", "v5p"),
  ("tpu v5", "v5p"),
  ("tpu v6 lite", "v6e"),
  ("tpu v6e", "v6e"),
  ("tpu v4", "v4"),
  ("a100", "a100"),
  ("h100", "h100"),
  ("h200", "h200"),
)


def chip_of(device_kind: str) -> Chip | None:
  """The figures of a device kind (`jax.devices()[0].device_kind`); None when unknown (a CPU)."""
  kind = device_kind.lower()
  for pattern, name in _KINDS:
    if pattern in kind:
      return CHIPS[name]
  return None
