"""Reading input files on local disk or an object store (gs://, s3://) through one set of
functions: fsspec for URIs (gcsfs for gs://, in the `gcs` extra), the os module for local paths.

`RangeReader` reads byte ranges of one file from any thread and any process: a local file with
os.pread, a remote one with ranged GETs.
"""

from __future__ import annotations

import glob as glob_lib
import os
from typing import IO

from ipadapter_jax import storage


def _fs(path: str):
  """(fsspec filesystem, path without the scheme) of a URI."""
  import fsspec  # pylint: disable=import-outside-toplevel

  try:
    return fsspec.core.url_to_fs(path)
  except ImportError as e:
    raise ValueError(
      f"{path}: this filesystem needs a package that is not installed "
      f"({' '.join(str(e).split())[:200]})"
    ) from None


def join(path: str, *parts: str) -> str:
  return storage.join(path, *parts)


def isdir(path: str) -> bool:
  if storage.is_remote(path):
    fs, bare = _fs(path)
    return fs.isdir(bare)
  return os.path.isdir(path)


def isfile(path: str) -> bool:
  if storage.is_remote(path):
    fs, bare = _fs(path)
    return fs.isfile(bare)
  return os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """The names in a folder, sorted."""
  if storage.is_remote(path):
    fs, bare = _fs(path)
    fs.invalidate_cache(bare)  # other hosts write here: a cached listing would miss their files
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(bare, detail=False))
  return sorted(os.listdir(path))


def glob(pattern: str) -> list[str]:
  """The paths matching a glob pattern (`*`, `?`, `[...]`), sorted; URIs keep their scheme."""
  if storage.is_remote(pattern):
    fs, _ = _fs(pattern)
    scheme = pattern.split("://", 1)[0]
    return sorted(f"{scheme}://{p.lstrip('/')}" for p in fs.glob(pattern))
  return sorted(glob_lib.glob(pattern))


def read_bytes(path: str) -> bytes:
  if storage.is_remote(path):
    fs, bare = _fs(path)
    return fs.cat_file(bare)
  with open(path, "rb") as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole (small) file: local ones through a temporary name, so a reader never sees
  half of it; an object store shows an object only once it is complete."""
  storage.write_bytes(path, data)


def open_read(path: str, block_size: int = 8 << 20) -> IO[bytes]:
  """A seekable binary file object; remote files read ahead in `block_size` requests."""
  if storage.is_remote(path):
    fs, bare = _fs(path)
    return fs.open(bare, "rb", block_size=block_size)
  return open(path, "rb")


def open_write(path: str) -> IO[bytes]:
  """A binary file object for writing a large file in pieces (an object store uploads it in
  parts and shows it once closed)."""
  if storage.is_remote(path):
    fs, bare = _fs(path)
    return fs.open(bare, "wb")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return open(path, "wb")


def makedirs(path: str) -> None:
  if not storage.is_remote(path):  # an object store has no folders to make
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  """Deletes a file, if there is one."""
  if storage.is_remote(path):
    fs, bare = _fs(path)
    if fs.exists(bare):
      fs.rm(bare)
  elif os.path.exists(path):
    os.remove(path)


def rename(source: str, target: str) -> None:
  """Moves a file to its final name (an object store copies and deletes)."""
  if storage.is_remote(source):
    fs, bare = _fs(source)
    fs.mv(bare, _fs(target)[1])
  else:
    os.replace(source, target)


class Unreadable:
  """Stands in for a record's image when the source could not read it; decoding it fails with
  `reason` (so the pipeline skips the record and counts it)."""

  def __init__(self, reason: str):
    self.reason = reason

  def __repr__(self):
    return f"Unreadable({self.reason!r})"


class RangeReader:
  """Byte ranges of one file, from any thread and any process (it pickles as its path)."""

  def __init__(self, path: str):
    self.path = path

  def read(self, start: int, size: int) -> bytes:
    if storage.is_remote(self.path):
      fs, bare = _fs(self.path)
      data = fs.cat_file(bare, start, start + size)
    else:
      # Opened for each read: a cache of thousands of part files would otherwise hold as many
      # descriptors open in every reading process. Opening costs microseconds.
      fd = os.open(self.path, os.O_RDONLY)
      try:
        data = os.pread(fd, size, start)
      finally:
        os.close(fd)
    if len(data) != size:
      raise OSError(
        f"{self.path}: {len(data)} bytes at offset {start}, expected {size} (a truncated file)"
      )
    return data
