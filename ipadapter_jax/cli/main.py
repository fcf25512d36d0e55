"""`ipadapter-jax`: one command, one subcommand per module of ipadapter_jax.cli.

Each subcommand is that module's `main(argv) -> int`, imported only when it runs, so that
`--help`, `--version` and a misspelt subcommand answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import ipadapter_jax
from ipadapter_jax.cli.common import Parser

PROG = "ipadapter-jax"
# Subcommand -> (its module in ipadapter_jax.cli, what it does in one line).
COMMANDS = {
  "train": ("train", "train an IP-Adapter (or a UNet) from a config; rerunning resumes"),
  "sample": ("sample", "generate images from text and image prompts"),
  "convert": (
    "convert",
    "convert weights: official PyTorch files, diffusers folders, JAX checkpoints",
  ),
  "data": ("data", "build, cache and inspect image-text datasets"),
  "evaluate": ("evaluate", "CLIP-I and CLIP-T of an adapter on an annotation file"),
  "toy": ("toy", "the toy world: every stage on a CPU, then its evaluation"),
  "tpu-compile": (
    "tpu_compile",
    "compile training or sampling for a TPU slice, on any host: memory and FLOPs",
  ),
}


def version() -> str:
  """The version line: the number and where the package that runs is installed."""
  return f"{PROG} {ipadapter_jax.__version__} ({os.path.dirname(ipadapter_jax.__file__)})"


def build_parser() -> argparse.ArgumentParser:
  width = max(map(len, COMMANDS))
  listing = "\n".join(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items())
  p = Parser(
    prog=PROG,
    usage=f"{PROG} [--version] COMMAND [ARGS ...]",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description=ipadapter_jax.__doc__.strip(),
    epilog=f"commands:\n{listing}\n\n`{PROG} COMMAND --help` lists a command's flags.",
  )
  p.add_argument("--version", action="version", version=version())
  p.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=argparse.SUPPRESS)
  p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
  return p


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser()
  if not argv:
    parser.error(f"a command is needed: {', '.join(COMMANDS)}")
  args = parser.parse_args(argv)
  module = importlib.import_module(f"ipadapter_jax.cli.{COMMANDS[args.command][0]}")
  return module.main(args.args)


if __name__ == "__main__":
  sys.exit(main())
