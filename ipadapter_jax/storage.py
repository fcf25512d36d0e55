"""Run outputs on a local disk or an object store (gs://, s3://, ...), through one set of functions.

Local files are written atomically (a temporary file beside, then os.replace); remote URIs are
kept as they are and go through `etils.epath`, the layer Orbax uses too.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile

from etils import epath


def is_remote(path) -> bool:
  """Whether `path` is a URI with a scheme (gs://bucket/run), not a local path."""
  return "://" in os.fspath(path)


def resolve(path) -> str:
  """A local path made absolute; a remote URI unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def join(path, *parts) -> str:
  """`path` joined with `parts`, with "/" for URIs whatever the local separator."""
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def check_reachable(path) -> None:
  """Raises ValueError (one line) when `path`'s filesystem cannot be used from here: a gs://
  URI needs gcsfs (`pip install -e ".[gcs]"`), s3:// needs s3fs."""
  try:
    epath.Path(path).exists()
  except ImportError as e:
    raise ValueError(f"{path}: this filesystem needs a package that is not installed "
                     f"({' '.join(str(e).split())[:200]})") from None


def makedirs(path) -> None:
  """Creates a folder and its parents; an existing one is fine."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path) -> bool:
  return epath.Path(path).exists()


def isdir(path) -> bool:
  return epath.Path(path).is_dir()


def listdir(path) -> list[str]:
  """The names in a folder, sorted."""
  return sorted(p.name for p in epath.Path(path).iterdir())


def remove(path) -> None:
  """Deletes a file or a folder tree, if there is one."""
  if isdir(path):
    epath.Path(path).rmtree()
  elif exists(path):
    epath.Path(path).unlink()


def read_text(path) -> str:
  return epath.Path(path).read_text()


def write_text(path, text: str) -> None:
  """Writes a UTF-8 text file (atomically when local)."""
  write_bytes(path, text.encode())


def write_bytes(path, data: bytes) -> None:
  """Writes a file (atomically when local; an object store replaces objects whole anyway)."""
  path = os.fspath(path)
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  with staged(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def append_text(path, text: str) -> None:
  """Adds `text` at the end of a file, which is created when missing."""
  path = os.fspath(path)
  if is_remote(path):
    # Object stores cannot append: the object is rewritten whole.
    write_text(path, (read_text(path) if exists(path) else "") + text)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(text)


@contextlib.contextmanager
def staged(path):
  """Yields a local path for any local writer; the file or folder becomes `path` on success."""
  path = os.fspath(path)
  if not is_remote(path):
    with atomic_path(path) as tmp:
      yield tmp
    return
  # Object stores have no atomic rename: the result is uploaded once complete, and removed again
  # when the upload fails part way.
  tmp_dir = tempfile.mkdtemp(prefix="staged-")
  tmp = os.path.join(tmp_dir, posixpath.basename(path.rstrip("/")))
  try:
    yield tmp
    if not os.path.exists(tmp):
      raise FileNotFoundError(f"{tmp}: nothing was written to upload to {path}")
    if isdir(path):  # files of the older folder would stay among the new ones
      epath.Path(path).rmtree()
    try:
      _upload(tmp, path)
    except BaseException:
      remove(path)  # a partial upload would pass for a result
      raise
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)


def _upload(local: str, remote: str) -> None:
  """Copies a local file or folder tree to a remote URI."""
  if not os.path.isdir(local):
    epath.Path(local).copy(remote, overwrite=True)
    return
  makedirs(remote)
  for name in sorted(os.listdir(local)):
    _upload(os.path.join(local, name), join(remote, name))


@contextlib.contextmanager
def atomic_path(path: str):
  """A temporary local path beside `path` (a file or a folder), renamed over it only when the
  block succeeds: a failed write never leaves a half-written or clobbered result."""
  path = os.path.abspath(path)  # also drops a trailing separator
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=".partial-", dir=parent)
  tmp = os.path.join(tmp_dir, os.path.basename(path))
  try:
    yield tmp
    if os.path.isdir(path):  # os.replace cannot overwrite a folder: the old one moves aside
      previous = os.path.join(tmp_dir, ".previous")
      os.replace(path, previous)
      try:
        os.replace(tmp, path)
      except OSError:
        os.replace(previous, path)
        raise
    else:
      os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
