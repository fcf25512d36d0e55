"""The toy world end to end: every stage, then the evaluation (what `ipadapter-jax toy` runs)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

from ipadapter_jax.toy import composition as toy_composition
from ipadapter_jax.toy import structure as toy_structure
from ipadapter_jax.toy.configs import adapter as toy_adapter
from ipadapter_jax.toy.configs import finetune as toy_finetune
from ipadapter_jax.toy.evaluation import claims_table, evaluate_toy, table
from ipadapter_jax.toy.stages import QUICK, Sizes, log, pretrained_weights, train_stage


def run_world(
  workdir: str, quick: bool = False, from_scratch: bool = False, sampling_steps: int | None = None
) -> dict:
  """Every stage, then the evaluation; prints the tables and returns eval.json's contents."""
  sizes = QUICK if quick else Sizes()
  if sampling_steps:
    sizes = dataclasses.replace(sizes, sampling_steps=sampling_steps)
  start = time.perf_counter()
  pretrained = pretrained_weights(workdir, sizes, from_scratch)
  shared = {
    "model.pretrained": pretrained["base"],
    "model.image_encoder": pretrained["clip"],
    "eval_clip": pretrained["clip"],
    "eval_limit": sizes.validation_images,
    "eval_steps": sizes.sampling_steps,
  }
  adapter_file = train_stage(
    "adapter", toy_adapter, workdir, "ip_adapter.safetensors", sizes.num_steps, shared
  )
  train_stage("finetune", toy_finetune, workdir, "pipeline", sizes.num_steps, shared)
  log("eval: sampling held-out prompt images")
  result = evaluate_toy(workdir, pretrained, adapter_file, os.path.join(workdir, "finetune"), sizes)
  result["seconds_total"] = round(time.perf_counter() - start, 1)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(
    table(result)
    + "\n\n"
    + claims_table(result)
    + "\n\n"
    + toy_composition.table(result["composition"])
    + "\n\n"
    + toy_structure.table(result["structure"])
  )
  print(
    f"\nwrote {os.path.join(workdir, 'eval.json')} and {os.path.join(workdir, 'grid.png')} "
    f"(rows: prompt image, then every setting but the first) in "
    f"{result['seconds_total']:.0f} s"
  )
  return result
