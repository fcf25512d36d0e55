"""Training metrics: one JSON line per logged step, and TensorBoard events (process 0 only)."""

from __future__ import annotations

import json
import os

import jax


class MetricsWriter:
  """Appends to `workdir/metrics.jsonl` and `workdir/tensorboard/`; resumes cleanly."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def _truncate_after(self, step: int):
    """Drops lines logged after the restored checkpoint: those steps run again."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path, "w") as f:
      f.writelines(kept)

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in values.items():
      self._tb.add_scalar(key, float(value), step)

  def write_image(self, step: int, name: str, image_HWC):
    if self.enabled:
      self._tb.add_image(name, image_HWC, step, dataformats="HWC")

  def close(self):
    if self._tb is not None:
      self._tb.close()
