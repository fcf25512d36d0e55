"""Training metrics: one JSON line per logged step, and TensorBoard events (process 0 only)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid

import jax

from ipadapter_jax import storage
from ipadapter_jax.train.checks import TrainingError

# A remote event file is uploaded whole after every write: past this size the writer starts a
# new one, so that finished files are not sent again.
_REMOTE_EVENT_FILE_BYTES = 8 << 20


class MetricsWriter:
  """Appends to `workdir/metrics.jsonl` and `workdir/tensorboard/`; resumes cleanly."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = storage.join(workdir, "metrics.jsonl")
    self._tb_dir = storage.join(workdir, "tensorboard")
    self._tb = None
    self._local_tb_dir = None  # where events are written first when the workdir is remote
    self._uploaded = {}  # {event file name: bytes uploaded}
    if not self.enabled:
      return
    self._truncate_after(resume_step)
    if storage.is_remote(workdir):
      # tensorboardX writes local files only.
      self._local_tb_dir = tempfile.mkdtemp(prefix="tensorboard-")
    self._tb = self._summary_writer(purge_step=resume_step + 1)

  def _summary_writer(self, **kwargs):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

    if self._local_tb_dir is None:
      return SummaryWriter(self._tb_dir, **kwargs)
    # Names hold only the second and the host: a suffix keeps a restarted run's file from
    # replacing the remote file of the run before.
    return SummaryWriter(self._local_tb_dir, filename_suffix=f".{uuid.uuid4().hex[:8]}", **kwargs)

  def _truncate_after(self, step: int):
    """Drops lines logged after the restored checkpoint: those steps run again. A last line cut
    short (the process died mid-write) is dropped with a warning; any other unreadable line is
    an error, since this writer did not write it."""
    if not storage.exists(self.path):
      return
    lines = storage.read_text(self.path).splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        if number < len(lines):
          raise TrainingError(
            f"{self.path}: line {number} is not a metrics record; move the file aside to resume"
          ) from None
        print(
          f"warning: {self.path}: dropped its last line, cut short ({line.strip()[:60]!r})",
          file=sys.stderr,
        )
        continue
      if record["step"] <= step:
        kept.append(line)
    if kept != lines:
      storage.write_text(self.path, "".join(kept))

  def _upload_events(self):
    """Copies new events to `workdir/tensorboard/` when the workdir is remote."""
    if self._local_tb_dir is None:
      return
    # tensorboardX writes from a thread, so the newest events may not be in the file yet: the
    # next write sends them, and close() sends everything.
    self._tb.flush()
    self._upload_grown_files()
    if max(self._uploaded.values(), default=0) > _REMOTE_EVENT_FILE_BYTES:
      self._tb.close()
      self._upload_grown_files()
      for name in self._uploaded:  # complete and uploaded: never read or written again
        os.remove(os.path.join(self._local_tb_dir, name))
      self._uploaded = {}
      self._tb = self._summary_writer()

  def _upload_grown_files(self):
    """Uploads each local event file whose size changed since its last upload."""
    for name in sorted(os.listdir(self._local_tb_dir)):
      with open(os.path.join(self._local_tb_dir, name), "rb") as f:
        if os.fstat(f.fileno()).st_size == self._uploaded.get(name):
          continue
        data = f.read()
      storage.write_bytes(storage.join(self._tb_dir, name), data)
      self._uploaded[name] = len(data)

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in values.items()}}
    storage.append_text(self.path, json.dumps(record) + "\n")
    for key, value in values.items():
      self._tb.add_scalar(key, float(value), step)
    self._upload_events()

  def write_image(self, step: int, name: str, image_HWC):
    if self.enabled:
      self._tb.add_image(name, image_HWC, step, dataformats="HWC")
      self._upload_events()

  def close(self):
    if self._tb is None:
      return
    self._tb.close()
    self._tb = None
    if self._local_tb_dir is not None:
      self._upload_grown_files()
      shutil.rmtree(self._local_tb_dir, ignore_errors=True)
