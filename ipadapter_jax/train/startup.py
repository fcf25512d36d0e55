"""What a run prints on process 0 before its progress bar: the devices and the mesh, the batch,
the parameters, where it starts, what its sample grids show, and how its step compiled.

Plain lines on stderr (train.py keeps absl's logging at WARNING), each `name: value`, so that a
log of the run says what ran without opening its config.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from ipadapter_jax.train.compilation import TimedCompile
from ipadapter_jax.train.throughput import StepCost


def announce(lines):
  """Prints `lines` to stderr on process 0."""
  if jax.process_index() == 0:
    for line in lines:
      print(line, file=sys.stderr, flush=True)


def count(n: float) -> str:
  """A count in thousands, millions or billions: 22.3M."""
  for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if n >= size:
      return f"{n / size:.3g}{suffix}"
  return str(int(n))


def size(n: float) -> str:
  """Bytes in binary units: 85.1 MiB."""
  for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
    if n >= 1 << shift:
      return f"{n / (1 << shift):.3g} {unit}"
  return f"{int(n)} B"


def parameters(tree) -> tuple[int, int]:
  """(values, bytes) of a tree of arrays."""
  leaves = jax.tree.leaves(tree)
  values = sum(int(np.prod(x.shape)) for x in leaves)
  return values, sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)


def setup_lines(cfg, mesh, trainable, frozen, *, start: int, notes=()) -> list[str]:
  """The run's set-up: devices, processes, mesh, batch, parameters, start point; then `notes`
  (what the sample grids show, the profiler window), those that are not None."""
  devices = mesh.devices.flatten()
  kinds = sorted({d.device_kind for d in devices})
  per_device = cfg.batch_size // len(devices)
  (n_train, b_train), (n_frozen, b_frozen) = parameters(trainable), parameters(frozen)
  lines = [
    (
      f"devices: {len(devices)} x {', '.join(kinds)} ({devices[0].platform}), "
      f"{jax.local_device_count()} on this process"
    ),
    f"processes: {jax.process_count()}",
    "mesh: " + " x ".join(f"{name}={n}" for name, n in mesh.shape.items()),
    f"batch: {cfg.batch_size} global, {per_device} per device",
    (
      f"parameters: {count(n_train)} trainable ({size(b_train)}), {count(n_frozen)} frozen "
      f"({size(b_frozen)})"
    ),
    f"start: resuming from step {start} of {cfg.num_steps}"
    if start
    else f"start: from scratch, {cfg.num_steps} steps",
  ]
  return lines + [note for note in notes if note]


def compile_line(timed: TimedCompile, cache_dir: str | None) -> str:
  """How long the step took to trace and compile, and whether the persistent cache supplied
  it."""
  traced = f"traced and lowered in {timed.lower_seconds:.1f} s, "
  seconds = timed.compile_seconds
  if timed.source == "cache":
    return f"step: {traced}loaded from the compilation cache in {seconds:.1f} s ({cache_dir})"
  if timed.source == "compiled":
    least = jax.config.jax_persistent_cache_min_compile_time_secs
    kept = "written to" if seconds >= least else f"under {least:g} s, not written to"
    return (
      f"step: {traced}compiled in {seconds:.1f} s (not in the compilation cache; {kept} "
      f"{cache_dir})"
    )
  return f"step: {traced}compiled in {seconds:.1f} s (compilation cache off)"


def cost_line(cost: StepCost, device_kind: str) -> str:
  """The step's FLOPs per device and what utilisation is measured against."""
  if cost.flops is None:
    return "step cost: no FLOP count from the compiler; no utilisation"
  what = "XLA's count" + (
    f" + {cost.kernel_flops / 1e9:.4g} GFLOP in attention kernels" if cost.kernel_flops else ""
  )
  if cost.lower_bound:
    what += "; fused attention kernels uncounted: utilisation is a lower bound"
  peak = (
    f"utilisation against {cost.peak_flops / 1e12:.4g} TFLOP/s per chip"
    if cost.peak_flops
    else f"no utilisation: no peak known for {device_kind!r}"
  )
  return f"step cost: {cost.flops / 1e9:.4g} GFLOP per device ({what}); {peak}"
