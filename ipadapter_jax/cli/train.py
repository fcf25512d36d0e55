r"""The train command: train an IP-Adapter (or a UNet) on a device mesh; rerunning resumes.

  ipadapter-jax train --config sd15 --workdir runs/sd15 \
      --config.data.source=/data/built --config.batch_size=64

`--config` takes a registered name (ipadapter_jax.configs.CONFIGS) or the path of a file that
defines get_config() (optionally `FILE:ARG`, passed to it); `--config.KEY=VALUE` overrides one
key (ml_collections' config flags). The flags are absl's, parsed here into a FlagValues of this
call's own, so that a usage error is one line and main() can run more than once in a process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

from absl import flags, logging
from ml_collections import config_flags

from ipadapter_jax.cli.common import USAGE, UsageError, run_command
from ipadapter_jax.configs import CONFIGS, config_file

PROG = "ipadapter-jax train"
_CONFIG_VALUE = re.compile(r"^--?config(=|$)")  # --config X, --config=X; not --config.key=...

HELP = f"""usage: {PROG} --config NAME|FILE --workdir DIR [--config.KEY=VALUE ...]

Train an IP-Adapter (or a UNet) on a device mesh; running the same command again resumes from
the work directory's last checkpoint.

flags:
  --config NAME|FILE   a registered config ({", ".join(CONFIGS)}) or a Python file
                       defining get_config() (FILE:ARG passes ARG to it)
  --workdir DIR        where checkpoints, metrics and exports go (local, gs:// or s3://)
  --config.KEY=VALUE   override one key of the config, e.g. --config.batch_size=64
                       --config.data.source=/data/built
  -h, --help           show this help

exit codes: 0 finished, 1 a run error, 2 a usage error, 128 + N stopped by signal N (run the
same command again to resume)."""


def resolve_config(argv: list[str]) -> list[str]:
  """argv with each `--config` value that is a registered name replaced by its installed file;
  a value that is neither a name nor an existing file is a usage error naming the known ones."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == "--":
      break
    match = _CONFIG_VALUE.match(arg)
    if not match:
      continue
    if match.group(1) == "=":
      at, value = i, arg.split("=", 1)[1]
    elif i + 1 < len(out):
      at, value = i + 1, out[i + 1]
    else:
      continue  # absl reports the missing value
    path, colon, extra = value.partition(":")
    named = config_file(path)
    if named:
      path = named
    elif not os.path.isfile(path):
      raise UsageError(
        f"--config {value}: no such config: a file defining get_config() or one of "
        f"{', '.join(CONFIGS)}"
      )
    out[at] = (f"{arg.split('=', 1)[0]}=" if at == i else "") + path + colon + extra
  return out


def _one_line(error) -> str:
  """A message (absl's config-file errors carry a whole traceback) as one line."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
    return f"{lines[0]} {lines[-1]}"  # what failed, and the exception that says why
  return " ".join(lines)


def _cause(error: BaseException) -> str:
  """The innermost message of ml_collections' nested KeyError / AttributeError."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def parse(argv: list[str]):
  """(config, workdir) from the command's arguments; raises UsageError."""
  argv = resolve_config(argv)
  values = flags.FlagValues()
  full_argv = [PROG, *argv]
  config = config_flags.DEFINE_config_file(
    "config",
    None,
    "a registered config name or a config file",
    flag_values=values,
    lock_config=True,
    sys_argv=full_argv,
  )
  workdir = flags.DEFINE_string(
    "workdir", None, "where checkpoints, metrics and exports go", flag_values=values
  )
  flags.mark_flags_as_required(["config", "workdir"], flag_values=values)
  try:
    rest = values(full_argv)
  except flags.Error as e:
    raise UsageError(_one_line(e)) from e
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key not in the config
    raise UsageError(
      f"a --config.KEY override names no key of the config: {_one_line(_cause(e))}"
    ) from e
  except Exception as e:  # pylint: disable=broad-except  # the config file's own failure
    raise UsageError(
      f"--config: the config file failed to load: {type(e).__name__}: {_one_line(e)}"
    ) from e
  if rest[1:]:
    raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
  return config.value, workdir.value


def train_command(cfg, workdir: str) -> int:
  """Trains; process 0 prints the run's summary as JSON. The exit code: 0, or 128 + the signal
  that stopped the run (rerunning resumes it)."""
  # pylint: disable=import-outside-toplevel
  import jax

  from ipadapter_jax.train.loop import train
  from ipadapter_jax.train.preemption import exit_code

  summary = train(cfg, workdir)
  if jax.process_index() == 0:
    print(json.dumps(summary))
  if summary["stopped_by_signal"]:
    return exit_code(getattr(signal, summary["signal"]))
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if any(arg in ("-h", "--help") for arg in argv[: argv.index("--") if "--" in argv else None]):
    print(HELP)
    return 0
  try:
    config, workdir = parse(argv)
  except UsageError as e:
    print(f"error: {PROG}: {e} (--help lists the flags)", file=sys.stderr)
    return USAGE
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save notes out of the progress bar
  return run_command(lambda: train_command(config, workdir))


if __name__ == "__main__":
  sys.exit(main())
