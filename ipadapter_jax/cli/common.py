"""What every subcommand shares: one error convention.

A usage error (a bad flag, a missing argument) exits 2, a run error (a bad file, an impossible
config, a non-finite loss) exits 1, each as a single `error:` line on stderr; a run stopped by a
signal keeps its own code (128 + the signal).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

USAGE, FAILED = 2, 1


class UsageError(Exception):
  """The arguments cannot be run as given (raised after parsing, e.g. flags that conflict)."""


class Parser(argparse.ArgumentParser):
  """argparse with the project's one-line usage error instead of usage text + error."""

  def error(self, message):
    print(f"error: {self.prog}: {message} (--help lists the flags)", file=sys.stderr)
    sys.exit(USAGE)


def run_errors() -> tuple[type[BaseException], ...]:
  """The failures a command reports in one line: bad input, not a bug."""
  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.train.checks import TrainingError

  return (ValueError, OSError, TrainingError)  # CheckpointError, ImageFileError are ValueErrors


def run_command(body: Callable[[], object]) -> int:
  """Runs a parsed command and turns its known failures into the exit convention: the body's
  return value is the exit code when it is an int (a stopped run's 128 + signal), else 0."""
  try:
    code = body()
    return code if isinstance(code, int) else 0
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return USAGE
  except run_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    return FAILED
