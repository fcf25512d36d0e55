"""The speed benchmark script runs (its numbers live in benchmarks/RESULTS.md, not here)."""

import json
import os
import sys

import diffusers
import jax
import torch
from flax import nnx

from ipadapter_jax.models import AdapterConfig, AdapterParam
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)
import speed  # noqa: E402


def test_sd15_small_is_the_pinned_size():
  adapter = AdapterConfig(num_tokens=4, embed_dim=1024)
  unet = nnx.eval_shape(
    lambda: UNet2DConditionModel(
      UNetConfig.from_diffusers(speed.CONFIGS["sd15-small"].unet), adapter=adapter, rngs=nnx.Rngs(0)
    )
  )
  count = lambda f: sum(x.size for x in jax.tree.leaves(nnx.state(unet, f)))
  image_proj = count(nnx.All(AdapterParam, nnx.PathContains("image_proj")))
  assert count(nnx.Param) - image_proj == 41_356_484  # the UNet with its decoupled layers


def _diffusers_counts(bench, num_tokens: int) -> dict:
  """The parameters of the benchmark's diffusers UNet and of an adapter on it, counted there."""
  unet = diffusers.UNet2DConditionModel(**bench.unet)
  context = bench.unet["cross_attention_dim"]
  cross = [m for n, m in unet.named_modules() if n.endswith("attn2")]
  assert cross and all(isinstance(m.to_k, torch.nn.Linear) for m in cross)
  return {
    "base_unet": sum(p.numel() for p in unet.parameters()),
    # to_k_ip and to_v_ip: the shapes of to_k and to_v, without bias
    "to_k_ip_to_v_ip": sum(2 * context * m.to_k.out_features for m in cross),
    # one Linear to num_tokens context vectors, then a LayerNorm
    "image_proj": (bench.image_embed_dim + 1) * num_tokens * context + 2 * context,
  }


def test_speed_script_runs_and_reports(tmp_path, capsys):
  out = tmp_path / "speed.json"
  assert (
    speed.main(["--config", "tiny", "--repeats", "1", "--skip_first_image", "--out", str(out)]) == 0
  )
  result = json.loads(out.read_text())
  j = result["jax"]
  assert j["parameters"] == _diffusers_counts(speed.CONFIGS["tiny"], num_tokens=4)
  for side in ("jax", "torch"):
    for key in ("forward_s", "train_step_s", "sampling_per_image_s"):
      assert result[side][key] > 0, (side, key)
  assert not j["sampling_recompiled"]
  # Rematerialisation recomputes in the backward pass: more FLOPs the less is saved.
  flops = {policy: j["remat"][policy]["gflop"] for policy in ("none", "dots", "full")}
  assert flops["none"] < flops["dots"] < flops["full"], flops
  assert j["train_gflop"] == flops["none"] and j["train_step_s"] == j["remat"]["none"]["seconds"]
  assert j["train_gflop"] > j["forward_gflop"] > 0  # the step runs the forward and a backward
  assert result["input_pipeline"]["raw_examples_per_s"] > 0
  # The printed table is the JSON's numbers: milliseconds and the JAX / PyTorch ratio.
  rows = {
    line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
    for line in capsys.readouterr().out.splitlines()
    if line.startswith("| ")
  }
  for name, key in (
    ("UNet forward (CFG batch)", "forward_s"),
    ("adapter train step", "train_step_s"),
    ("sampling loop, per image", "sampling_per_image_s"),
  ):
    jax_s, torch_s = j[key], result["torch"][key]
    assert rows[name] == [
      f"{jax_s * 1e3:.1f} ms",
      f"{torch_s * 1e3:.1f} ms",
      f"{jax_s / torch_s:.2f}",
    ], (name, rows[name])
