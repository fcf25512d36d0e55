"""An adapter's scale as one value per decoupled layer: floats, arrays, block dictionaries, presets.

A scale may be given as
  - a float: every layer;
  - a sequence of floats: one per layer, in checkpoint order (down, up, mid);
  - diffusers' block dictionary, {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0,
    0.0]}, "mid": 0.5}: a number for a whole part, or per block with attentions a number or one
    value per attention of the block; every layer not named gets 0, and every transformer layer
    of an attention shares its value (diffusers' `set_ip_adapter_scale` expansion);
  - a preset name: "style" or "style_and_layout" (InstantStyle, docs/composition.md).
Where diffusers silently ignores a block name that does not exist (or has no attention layers),
this module refuses it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

PRESETS = ("style", "style_and_layout")
_PARTS = {"down": "down_blocks", "up": "up_blocks"}


def _blocks(names: list[str], part: str) -> dict[int, int]:
  """{block index: attentions in it} of the blocks of `part` ("down_blocks" / "up_blocks")."""
  out: dict[int, set] = {}
  for name in names:
    if name.startswith(part + "."):
      _, block, _, attention = name.split(".")
      out.setdefault(int(block), set()).add(int(attention))
  return {block: len(attentions) for block, attentions in sorted(out.items())}


def preset(name: str, names: list[str]) -> dict:
  """InstantStyle's block dictionaries for this UNet: "style" is the middle attention of the
  first up block with attentions; "style_and_layout" adds the second attention of the last down
  block with attentions. On SDXL these are exactly diffusers' documented dictionaries
  ({"up": {"block_0": [0.0, 1.0, 0.0]}} and {"down": {"block_2": [0.0, 1.0]}, ...})."""
  if name not in PRESETS:
    raise ValueError(f"unknown scale preset {name!r}; choose one of {', '.join(PRESETS)}")

  def one_at(count: int, index: int) -> list[float]:
    return [1.0 if j == min(index, count - 1) else 0.0 for j in range(count)]

  up, down = _blocks(names, "up_blocks"), _blocks(names, "down_blocks")
  first_up = next(iter(up))
  out = {"up": {f"block_{first_up}": one_at(up[first_up], 1)}}
  if name == "style_and_layout":
    last_down = list(down)[-1]
    out["down"] = {f"block_{last_down}": one_at(down[last_down], 1)}
  return out


def _number(value, where: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"scale {where}: expected a number, got {value!r}")
  if not np.isfinite(value):
    raise ValueError(f"scale {where}: must be finite, got {value!r}")
  return float(value)


def _expand_dict(scale: dict, names: list[str]) -> dict[str, float]:
  """{attention path: value} for every attention holding cross-attention layers."""
  unknown = set(scale) - {"down", "up", "mid"}
  if unknown:
    raise ValueError(
      f"scale: unknown part {sorted(unknown)[0]!r}; a block dictionary has 'down', 'up' and 'mid'"
    )
  values = {name: 0.0 for name in names}  # diffusers: whatever is not named gets 0
  if "mid" in scale:
    mid = scale["mid"]
    if isinstance(mid, list):
      if len(mid) != 1:
        raise ValueError(f"scale mid: expected 1 value, got {len(mid)}")
      mid = mid[0]
    values["mid_block.attentions.0"] = _number(mid, "mid")
  for part, module in _PARTS.items():
    if part not in scale:
      continue
    blocks = _blocks(names, module)
    given = scale[part]
    if not isinstance(given, dict):
      given = {f"block_{b}": given for b in blocks}
    for key, value in given.items():
      block = int(key[len("block_") :]) if key.startswith("block_") and key[6:].isdigit() else None
      if block not in blocks:
        have = ", ".join(f"block_{b}" for b in blocks)
        raise ValueError(
          f"scale {part}.{key}: no such {part} block with attention layers (this UNet has {have})"
        )
      count = blocks[block]
      if isinstance(value, list):
        if len(value) == 1:
          value = value * count
        if len(value) != count:
          raise ValueError(
            f"scale {part}.{key}: expected {count} values (one per attention), got {len(value)}"
          )
      else:
        value = [value] * count
      for j, v in enumerate(value):
        values[f"{module}.{block}.attentions.{j}"] = _number(v, f"{part}.{key}[{j}]")
  return values


def parse_scale(text: str) -> Any:
  """A command-line scale: a float, a preset name or a JSON block dictionary."""
  text = text.strip()
  if text in PRESETS:
    return text
  try:
    number = float(text)
  except ValueError:
    pass
  else:
    if not math.isfinite(number):
      raise ValueError(f"--scale {text!r}: adapter scale must be finite")
    return number
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    raise ValueError(
      f"--scale {text!r}: not a number, a preset ({', '.join(PRESETS)}) or a JSON block dictionary"
    ) from None
  if not isinstance(value, (dict, list)):
    raise ValueError(f"--scale {text!r}: expected a number, a preset or a block dictionary")
  return value


def expand_scale(scale, names: list[str]) -> np.ndarray:
  """[L] float32: `scale` (float, per-layer sequence, block dictionary or preset name) for the
  decoupled layers whose attentions are `names` (`UNet2DConditionModel.cross_attention_names`)."""
  if isinstance(scale, str):
    scale = preset(scale, names)
  if isinstance(scale, dict):
    values = _expand_dict(scale, names)
    return np.asarray([values[name] for name in names], np.float32)
  array = np.asarray(scale, np.float32)
  if array.shape not in ((), (len(names),)):
    raise ValueError(
      f"adapter scale must be a number, a preset, a block dictionary or "
      f"{len(names)} values (one per cross-attention layer), got shape "
      f"{list(array.shape)}"
    )
  if not np.all(np.isfinite(array)):
    raise ValueError(f"adapter scale must be finite, got {scale!r}")
  return np.broadcast_to(array, (len(names),)).astype(np.float32)
