"""Shared checks for reading PyTorch-world config.json files into this project's config
dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any


def check_fixed(raw: dict[str, Any], fixed: dict[str, Any], source: str) -> None:
  """Pops each key of `fixed` from `raw`; a value other than the one supported raises."""
  for key, allowed in fixed.items():
    value = raw.pop(key, allowed)
    if isinstance(allowed, bool) and isinstance(value, (list, tuple)) and not any(value):
      value = allowed  # a per-block list of False
    if value != allowed:
      raise ValueError(f"{source}: '{key}'={value!r} is not supported (only {allowed!r})")


def reject_unknown(raw: dict[str, Any], cls, source: str) -> None:
  """Raises naming the first key of `raw` that is not a field of the dataclass `cls`."""
  unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    raise ValueError(f"{source}: unknown key '{unknown[0]}'{more}")


def require(raw: dict[str, Any], keys, source: str) -> None:
  for key in keys:
    if key not in raw:
      raise ValueError(f"{source}: required key '{key}' is missing")
