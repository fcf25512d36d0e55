"""Stopping a run on a signal: every host at the same step, with a checkpoint of that step.

SIGTERM is the preemption and maintenance notice of Cloud TPU VMs, GKE and most schedulers, and
on a slice it reaches the hosts at different times. In a multi-process run JAX's preemption
service catches it on whichever host gets it and agrees with every host on the next step that
all of them reach (`multihost_utils.reached_preemption_sync_point`): a host that left on its own
would leave the others waiting in the next step's collectives. A one-process run catches
SIGTERM and SIGINT itself (a second Ctrl-C interrupts at once).

A stopped run exits with 128 + the signal's number, the shell's convention (143 for SIGTERM), so
that a restart loop or a job controller can tell "preempted, run again" from "finished" (0) and
"failed" (1).
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


def exit_code(signum: int) -> int:
  return 128 + signum


class StopSignal:
  """Whether the run must stop after a step; ask after every step, on every host."""

  def __init__(self):
    # JAX's service owns SIGTERM once the process joined a distributed run: a Python handler
    # would replace its C handler and the other hosts would never hear of the notice.
    self.shared = jax.distributed.is_initialized()
    self.signum: int | None = None
    self._previous = {}
    if not self.shared:
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._note)

  def _note(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum is not None:
      raise KeyboardInterrupt  # asked twice: stop now, without the checkpoint
    self.signum = signum

  def reached(self, step: int) -> bool:
    """True at the step this host (and, in a distributed run, every host) stops after."""
    if self.shared and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM  # the only notice the service relays
    return self.signum is not None

  def close(self):
    """Gives the signals back to whoever handled them before."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""
