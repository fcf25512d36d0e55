"""A profiler window over a run's steps: `profile_steps = "FIRST:LAST"` traces steps FIRST to LAST
(both included) with `jax.profiler` into `workdir/profile/`, in the layout TensorBoard's profile
plugin reads (`plugins/profile/<session>/<host>.xplane.pb`), on every process.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

from ipadapter_jax import storage


def parse_steps(spec: str) -> tuple[int, int] | None:
  """(first, last) of a "FIRST:LAST" window; None for ""; ValueError (one line) otherwise."""
  if not spec:
    return None
  first, sep, last = spec.partition(":")
  try:
    window = int(first), int(last)
  except ValueError:
    window = None
  if not sep or window is None or not 1 <= window[0] <= window[1]:
    raise ValueError(
      f"profile_steps must be 'FIRST:LAST' (steps, 1 <= FIRST <= LAST) or empty, got {spec!r}"
    )
  return window


class ProfileWindow:
  """Starts a trace before the window's first step is dispatched and stops it once its last
  step's outputs are ready (`ends_with`), so that the trace holds the whole of every step in it.
  A run resumed inside the window traces the rest of it; one that ends inside it stops at
  `close`."""

  def __init__(self, spec: str, workdir: str):
    self.window = parse_steps(spec)
    self.out = storage.join(workdir, "profile")
    self._local = None  # where the trace is written while it runs
    self.done = False

  def describe(self, start: int) -> str | None:
    """A startup line for a run that starts after step `start`; None when there is no window."""
    if self.window is None:
      return None
    first, last = self.window
    if last <= start:
      return f"profile: steps {first} to {last} ran before step {start}: no trace"
    return f"profile: steps {max(first, start + 1)} to {last} traced into {self.out}"

  @property
  def active(self) -> bool:
    return self._local is not None

  def before(self, step: int):
    """Called before step `step` (1-based) is dispatched."""
    if self.window is None or self.active or self.done:
      return
    first, last = self.window
    if first <= step <= last:
      # jax.profiler writes local files: a remote workdir gets them when the trace stops.
      self._local = tempfile.mkdtemp(prefix="profile-") if storage.is_remote(self.out) else self.out
      jax.profiler.start_trace(self._local)

  def ends_with(self, step: int) -> bool:
    """Whether the trace stops after step `step`: the caller waits for its outputs (so that the
    trace holds the whole step), then calls `close`."""
    return self.active and step >= self.window[1]

  def close(self):
    """Stops a running trace (the last step, or a run that ended inside the window)."""
    if not self.active:
      return
    local, self._local, self.done = self._local, None, True
    jax.profiler.stop_trace()
    if local != self.out:
      for root, _, files in os.walk(local):
        for name in files:
          path = os.path.join(root, name)
          with open(path, "rb") as f:
            storage.write_bytes(
              storage.join(self.out, *os.path.relpath(path, local).split(os.sep)), f.read()
            )
      shutil.rmtree(local, ignore_errors=True)
