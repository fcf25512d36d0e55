"""The toy command: every stage of the toy world, then its evaluation (`run`, the default), or
the pretraining of the weights it ships (`pretrain`). `ipadapter-jax toy` runs it too."""

from __future__ import annotations

import argparse
import sys

from ipadapter_jax import storage
from ipadapter_jax.cli.common import Parser, run_command
from ipadapter_jax.toy.configs import world as toy_world
from ipadapter_jax.toy.run import run_world
from ipadapter_jax.toy.stages import MANIFEST, QUICK, SHIPPED, Sizes, pretrain, ship

# The weights' MANIFEST.json names this command and lists every file: it marks the folder as
# pretrain's own output, which a re-run may replace (the shipped weights, the default --out).
# The shipped weights were written under this name, so it stays as it is.
PRETRAIN = "ipadapter-jax toy pretrain"


def build_parser() -> argparse.ArgumentParser:
  p = Parser(
    prog="ipadapter-jax toy",
    description="Every stage of the toy world on a CPU, then its evaluation (run), or "
    "the pretraining of the weights it ships (pretrain).",
  )
  p.add_argument(
    "command",
    nargs="?",
    default="run",
    choices=("run", "pretrain"),
    help="run: the toy world from the shipped weights (default); pretrain: "
    "rebuild those weights from nothing",
  )
  p.add_argument("--workdir", default=None, help="default: runs/toy (runs/toy_pretrain)")
  p.add_argument(
    "--out",
    default=SHIPPED,
    help="pretrain: where the weights are written: a new or empty folder, or an "
    "earlier pretrain output (default: the shipped weights)",
  )
  p.add_argument(
    "--from_scratch",
    action="store_true",
    help="run: pretrain in the work directory instead of using the shipped weights",
  )
  p.add_argument(
    "--sampling_steps",
    type=int,
    default=None,
    help=f"DDIM steps of the evaluation (default {Sizes.sampling_steps})",
  )
  p.add_argument("--quick", action="store_true", help="a minute-sized world (for tests)")
  return p


def pretrain_command(out: str, workdir: str | None, quick: bool) -> None:
  """Pretrains every toy model in `workdir` and ships them to `out` (checked before training)."""
  out = storage.check_output(out, PRETRAIN, marker=MANIFEST)
  workdir = workdir or "runs/toy_pretrain"
  folders = pretrain(workdir, QUICK if quick else Sizes())
  with storage.staged(out, PRETRAIN, marker=MANIFEST) as local:
    ship(workdir, folders, local, command=PRETRAIN + (" --quick" if quick else ""))
  print(f"wrote {out} ({MANIFEST}: how it was made and every file's sha256)")


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "pretrain":
    return run_command(lambda: pretrain_command(args.out, args.workdir, args.quick))
  return run_command(
    lambda: run_world(
      args.workdir or toy_world.WORKDIR, args.quick, args.from_scratch, args.sampling_steps
    )
  )


if __name__ == "__main__":
  sys.exit(main())
