"""Adapter scales expand to one value per decoupled layer exactly as diffusers'
`set_ip_adapter_scale` expands them, and refuse what diffusers would silently ignore."""

import numpy as np
import pytest
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales_for_one_adapter

from ipadapter_jax.generation.adapter_scales import expand_scale, parse_scale, preset

# The attentions of an SD1.5-shaped UNet in checkpoint order (down, up, mid): two per down block
# with attentions, three per up block.
DOWN, UP = [0, 1, 2], [1, 2, 3]
NAMES = (
  [f"down_blocks.{b}.attentions.{j}" for b in DOWN for j in range(2)]
  + [f"up_blocks.{b}.attentions.{j}" for b in UP for j in range(3)]
  + ["mid_block.attentions.0"]
)


class _UNetKeys:
  """What diffusers' expansion reads of a UNet: its state-dict keys, to check the layers exist."""

  def state_dict(self):
    return {f"{name}.transformer_blocks.0.attn2.to_k.weight": None for name in NAMES}


def _diffusers(scale) -> np.ndarray:
  """diffusers' expansion, {attention name: value}, in NAMES' order."""
  expanded = _maybe_expand_lora_scales_for_one_adapter(
    scale, {"down": DOWN, "up": UP}, {"down": 2, "up": 3}, model=_UNetKeys(), default_scale=0.0
  )
  return np.asarray([expanded[name] for name in NAMES], np.float32)


@pytest.mark.parametrize(
  "scale",
  [
    {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}},
    {"down": 0.5, "mid": [0.25]},
    {"up": {"block_3": 0.7, "block_1": [0.2]}, "mid": 1.0},
    {"down": {"block_0": [0.3, 0.6]}},
  ],
)
def test_block_dictionaries_expand_as_in_diffusers(scale):
  np.testing.assert_array_equal(expand_scale(scale, NAMES), _diffusers(scale))


def test_presets_are_instantstyle_dictionaries():
  assert preset("style", NAMES) == {"up": {"block_1": [0.0, 1.0, 0.0]}}
  assert preset("style_and_layout", NAMES) == {
    "up": {"block_1": [0.0, 1.0, 0.0]},
    "down": {"block_2": [0.0, 1.0]},
  }
  style = expand_scale("style", NAMES)
  assert style.sum() == 1.0 and style[NAMES.index("up_blocks.1.attentions.1")] == 1.0


def test_numbers_and_per_layer_values():
  np.testing.assert_array_equal(expand_scale(0.6, NAMES), np.full(len(NAMES), 0.6, np.float32))
  per_layer = np.linspace(0, 1, len(NAMES))
  np.testing.assert_array_equal(expand_scale(per_layer, NAMES), per_layer.astype(np.float32))
  with pytest.raises(ValueError, match="16 values"):
    expand_scale([1.0, 2.0], NAMES)
  with pytest.raises(ValueError, match="finite"):
    expand_scale(float("nan"), NAMES)


def test_what_diffusers_ignores_is_refused():
  with pytest.raises(ValueError, match=r"down.block_3: no such down block"):
    expand_scale({"down": {"block_3": 1.0}}, NAMES)  # down_blocks.3 has no attentions
  with pytest.raises(ValueError, match="unknown part 'middle'"):
    expand_scale({"middle": 1.0}, NAMES)
  with pytest.raises(ValueError, match="expected 3 values"):
    expand_scale({"up": {"block_1": [1.0, 0.0]}}, NAMES)
  with pytest.raises(ValueError, match="expected a number"):
    expand_scale({"mid": "high"}, NAMES)


def test_command_line_scales():
  assert parse_scale(" 0.5 ") == 0.5
  assert parse_scale("style") == "style"
  assert parse_scale('{"up": {"block_1": [0, 1, 0]}}') == {"up": {"block_1": [0, 1, 0]}}
  with pytest.raises(ValueError, match="not a number, a preset"):
    parse_scale("loud")
  with pytest.raises(ValueError, match="expected a number, a preset or a block dictionary"):
    parse_scale('"style"')
