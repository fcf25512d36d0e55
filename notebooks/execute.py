"""Runs a notebook at its own defaults and writes it back with its outputs.

  python notebooks/execute.py notebooks/weights_roundtrip.ipynb [--timeout S]  # S per cell

Every code cell runs once, top to bottom, in one fresh kernel started in the repository root
(where `runs/toy` is the main command's toy world). The notebook's metadata then records what
produced the outputs under "ipadapter_jax": the sha256 of its code cells (`source_sha256`), the
package version, the date, the machine and the wall time; tests/test_notebooks.py checks that the
committed code still hashes to it. If any cell fails the file is left as it was. The kernel
sees this process's environment (JAX_PLATFORMS=cpu keeps JAX from probing an installed libtpu,
whose logs would land in the outputs), except MPLBACKEND: figures are shown inline.

Progress bars are kept as a terminal would show them (the last state of each line), so that the
committed outputs stay short.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METADATA_KEY = "ipadapter_jax"


def source_sha256(book) -> str:
  """The sha256 of the notebook's code cells, in order (a NUL between cells: no cell has one)."""
  sources = [cell.source for cell in book.cells if cell.cell_type == "code"]
  return hashlib.sha256("\0".join(sources).encode("utf-8")).hexdigest()


def as_displayed(text: str) -> str:
  """Stream text with each carriage-returned line reduced to what is left on screen."""
  return "\n".join(re.sub(r"\r+$", "", line).rsplit("\r", 1)[-1] for line in text.split("\n"))


def _joined_streams(outputs: list) -> list:
  """The outputs with each run of one stream's pieces joined and shown as displayed."""
  joined = []
  for output in outputs:
    previous = joined[-1] if joined else None
    if (
      output.output_type == "stream"
      and previous is not None
      and previous.output_type == "stream"
      and previous.name == output.name
    ):
      previous.text += output.text
    else:
      joined.append(output)
  for output in joined:
    if output.output_type == "stream":
      output.text = as_displayed(output.text)
  return joined


def machine() -> str:
  """The OS, the CPU model and its core count: where the outputs were computed."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass  # not Linux: the platform's own name
  return f"{platform.platform()}, {cpu}, {os.cpu_count()} cores"


def _failure(book) -> str | None:
  """The first error output, as 'cell N: Name: value', or None."""
  code_cells = [c for c in book.cells if c.cell_type == "code"]
  for number, cell in enumerate(code_cells, 1):
    for output in cell.get("outputs", []):
      if output.output_type == "error":
        return f"code cell {number}: {output.ename}: {output.evalue}"
  return None


def execute(path: str, timeout: float | None) -> float:
  """Executes `path` in place; returns the seconds it took. Raises ValueError (the file
  untouched) when a cell fails, times out or the kernel dies."""
  # pylint: disable=import-outside-toplevel
  import nbformat
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

  import ipadapter_jax

  book = nbformat.read(path, as_version=4)
  for cell in book.cells:
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  client = NotebookClient(
    book,
    timeout=timeout,
    kernel_name="python3",
    record_timing=False,
    resources={"metadata": {"path": ROOT}},
  )
  start = time.perf_counter()
  try:
    # A backend set in the environment (Agg, say) would keep the figures out of the outputs.
    client.execute(env={k: v for k, v in os.environ.items() if k != "MPLBACKEND"})
  except CellExecutionError:
    pass  # the error output names the cell, below
  except CellTimeoutError as e:
    raise ValueError(
      f"{path}: a cell ran past --timeout {timeout} s; the file is left as it was"
    ) from e
  except (DeadKernelError, AssertionError) as e:  # a dead kernel can fail nbclient's clean-up
    raise ValueError(f"{path}: the kernel died; the file is left as it was") from e
  seconds = time.perf_counter() - start
  failure = _failure(book)
  if failure:
    raise ValueError(f"{path}: {failure.splitlines()[0]}; the file is left as it was")
  for cell in book.cells:
    if cell.cell_type == "code":
      cell.outputs = _joined_streams(cell.outputs)
  book.metadata.pop("widgets", None)  # widget state: bulky, and nothing to show without a kernel
  book.metadata[METADATA_KEY] = {
    "source_sha256": source_sha256(book),
    "version": ipadapter_jax.__version__,
    "executed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": machine(),
    "seconds": round(seconds, 1),
  }
  # Written beside the notebook and moved over it: an interrupted write leaves the old file.
  handle, temporary = tempfile.mkstemp(suffix=".ipynb", dir=os.path.dirname(os.path.abspath(path)))
  try:
    with os.fdopen(handle, "w", encoding="utf-8") as f:
      nbformat.write(book, f)
    shutil.copymode(path, temporary)  # mkstemp's file is private; keep the notebook's mode
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return seconds


def main(argv: list[str] | None = None) -> int:
  sys.path.insert(0, ROOT)  # run as a script: the package of this checkout
  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.cli.common import Parser, UsageError, run_command

  parser = Parser(prog="notebooks/execute.py", description=__doc__.splitlines()[0])
  parser.add_argument("notebook", help="the .ipynb file to execute and write back")
  parser.add_argument(
    "--timeout", type=float, default=3600, help="seconds one cell may run (default 3600)"
  )
  args = parser.parse_args(argv)

  def body():
    if not args.notebook.endswith(".ipynb"):
      raise UsageError(f"{args.notebook}: not a notebook (.ipynb)")
    if not os.path.isfile(args.notebook):
      raise UsageError(f"{args.notebook}: no such file")
    if args.timeout <= 0:
      raise UsageError(f"--timeout {args.timeout}: must be positive")
    seconds = execute(args.notebook, args.timeout)
    print(f"executed {args.notebook} in {seconds:.0f} s", file=sys.stderr)

  return run_command(body)


if __name__ == "__main__":
  sys.exit(main())
