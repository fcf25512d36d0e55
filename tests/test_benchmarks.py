"""The speed benchmark script runs (its numbers live in benchmarks/RESULTS.md, not here)."""

import json
import os
import sys

import jax
from flax import nnx

from ipadapter_jax.models import AdapterConfig, AdapterParam
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import speed  # noqa: E402


def test_sd15_small_is_the_pinned_size():
  adapter = AdapterConfig(num_tokens=4, embed_dim=1024)
  unet = nnx.eval_shape(lambda: UNet2DConditionModel(
      UNetConfig.from_diffusers(speed.CONFIGS["sd15-small"].unet), adapter=adapter,
      rngs=nnx.Rngs(0)))
  count = lambda f: sum(x.size for x in jax.tree.leaves(nnx.state(unet, f)))
  image_proj = count(nnx.All(AdapterParam, nnx.PathContains("image_proj")))
  assert count(nnx.Param) - image_proj == 41_356_484  # the UNet with its decoupled layers


def test_speed_script_runs_and_reports(tmp_path, capsys):
  out = tmp_path / "speed.json"
  assert speed.main(["--config", "tiny", "--repeats", "1", "--skip_first_image",
                     "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  for side in ("jax", "torch"):
    for key in ("forward_s", "train_step_s", "sampling_per_image_s"):
      assert result[side][key] > 0, (side, key)
  assert not result["jax"]["sampling_recompiled"]
  assert set(result["jax"]["remat"]) == {"none", "dots", "full"}
  assert result["input_pipeline"]["raw_examples_per_s"] > 0
  assert "| adapter train step |" in capsys.readouterr().out
