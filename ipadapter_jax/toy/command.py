"""`python -m ipadapter_jax.toy`: every stage of the toy world, then its evaluation (`run_world`), or
the pretraining of the weights it ships (`pretrain`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from ipadapter_jax import storage
from ipadapter_jax.toy import composition as toy_composition, structure as toy_structure
from ipadapter_jax.toy.configs import (adapter as toy_adapter, finetune as toy_finetune,
                                       world as toy_world)
from ipadapter_jax.toy.evaluation import claims_table, evaluate_toy, table
from ipadapter_jax.toy.stages import (MANIFEST, QUICK, SHIPPED, Sizes, log, pretrain,
                                      pretrained_weights, ship, train_stage)
from ipadapter_jax.train.checks import TrainingError
from ipadapter_jax.weights.files import CheckpointError

# The weights' MANIFEST.json names this command and lists every file: it marks the folder as
# pretrain's own output, which a re-run may replace (the shipped weights, the default --out).
PRETRAIN = "python -m ipadapter_jax.toy pretrain"

# ----- The command -------------------------------------------------------------------------------

def run_world(workdir: str, quick: bool = False, from_scratch: bool = False,
        sampling_steps: int | None = None) -> dict:
  """Every stage, then the evaluation; prints the tables and returns eval.json's contents."""
  sizes = QUICK if quick else Sizes()
  if sampling_steps:
    sizes = dataclasses.replace(sizes, sampling_steps=sampling_steps)
  start = time.perf_counter()
  pretrained = pretrained_weights(workdir, sizes, from_scratch)
  shared = {"model.pretrained": pretrained["base"], "model.image_encoder": pretrained["clip"],
            "eval_clip": pretrained["clip"], "eval_limit": sizes.validation_images,
            "eval_steps": sizes.sampling_steps}
  adapter_file = train_stage("adapter", toy_adapter, workdir, "ip_adapter.safetensors",
                             sizes.num_steps, shared)
  train_stage("finetune", toy_finetune, workdir, "pipeline", sizes.num_steps, shared)
  log("eval: sampling held-out prompt images")
  result = evaluate_toy(workdir, pretrained, adapter_file, os.path.join(workdir, "finetune"),
                        sizes)
  result["seconds_total"] = round(time.perf_counter() - start, 1)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(table(result) + "\n\n" + claims_table(result) + "\n\n"
        + toy_composition.table(result["composition"]) + "\n\n"
        + toy_structure.table(result["structure"]))
  print(f"\nwrote {os.path.join(workdir, 'eval.json')} and {os.path.join(workdir, 'grid.png')} "
        f"(rows: prompt image, then every setting but the first) in "
        f"{result['seconds_total']:.0f} s")
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m ipadapter_jax.toy", description=__doc__.split("\n", maxsplit=1)[0])
  p.add_argument("command", nargs="?", default="run", choices=("run", "pretrain"),
                 help="run: the toy world from the shipped weights (default); pretrain: "
                      "rebuild those weights from nothing")
  p.add_argument("--workdir", default=None, help="default: runs/toy (runs/toy_pretrain)")
  p.add_argument("--out", default=SHIPPED,
                 help="pretrain: where the weights are written: a new or empty folder, or an "
                      "earlier pretrain output (default: the shipped weights)")
  p.add_argument("--from_scratch", action="store_true",
                 help="run: pretrain in the work directory instead of using the shipped weights")
  p.add_argument("--sampling_steps", type=int, default=None,
                 help=f"DDIM steps of the evaluation (default {Sizes.sampling_steps})")
  p.add_argument("--quick", action="store_true", help="a minute-sized world (for tests)")
  args = p.parse_args(argv)
  try:
    if args.command == "pretrain":
      out = storage.check_output(args.out, PRETRAIN, marker=MANIFEST)  # before any training
      workdir = args.workdir or "runs/toy_pretrain"
      sizes = QUICK if args.quick else Sizes()
      folders = pretrain(workdir, sizes)
      with storage.staged(out, PRETRAIN, marker=MANIFEST) as local:
        ship(workdir, folders, local, command=PRETRAIN + (" --quick" if args.quick else ""))
      print(f"wrote {out} ({MANIFEST}: how it was made and every file's sha256)")
    else:
      run_world(args.workdir or toy_world.WORKDIR, args.quick, args.from_scratch, args.sampling_steps)
  except (TrainingError, CheckpointError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
