"""A folder of images with captions, as Hugging Face's `imagefolder` lays it out, read in place.

The folder (or its split subfolder, e.g. `train/`) holds `metadata.jsonl` (one JSON object per
line) or `metadata.csv` (a header row), with a `file_name` column, the image's path relative to
the metadata file, and any other columns: the caption is the `text` column by default
(`data.caption_key` picks another). The source is random access (one record per metadata row),
so the grain pipeline shuffles, shards and resumes it like a built dataset.

Startup stays cheap at millions of rows: a local metadata.jsonl is indexed by its line offsets
and each row is parsed when it is read; a CSV file (whose quoted fields may span lines) or a
remote metadata file is parsed once into memory. A row that cannot be used (not JSON, no
`file_name`, a path that leaves the folder, a missing or unreadable image) becomes a record that
does not decode: the pipeline skips and counts it (`data.max_bad_records`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from typing import Any

import numpy as np

from ipadapter_jax import storage
from ipadapter_jax.data import paths
from ipadapter_jax.data.paths import Unreadable

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_NAME = "file_name"


def find_metadata(folder: str, split: str = "train") -> str | None:
  """The metadata file of `split`: in the split's subfolder, else (for "train" only) at the
  folder's root; None when there is none."""
  places = [paths.join(folder, split)] + ([folder] if split == "train" else [])
  for place in places:
    for name in METADATA_FILES:
      if paths.isfile(paths.join(place, name)):
        return paths.join(place, name)
  return None


def has_metadata(folder: str) -> bool:
  """Whether a folder is an imagefolder: a metadata file at its root or in a subfolder of it."""
  if any(paths.isfile(paths.join(folder, name)) for name in METADATA_FILES):
    return True
  if storage.is_remote(folder):
    return bool(paths.glob(paths.join(folder, "*", "metadata.*")))
  return any(
    paths.isfile(os.path.join(folder, d, name))
    for d in os.listdir(folder)
    if os.path.isdir(os.path.join(folder, d))
    for name in METADATA_FILES
  )


def _line_offsets(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(start, end) byte offsets of the non-blank lines of a text buffer."""
  chunk = 1 << 26  # a file of gigabytes is scanned in pieces, not compared whole at once
  ends = np.concatenate(
    [np.zeros(0, np.int64)]
    + [np.flatnonzero(data[i : i + chunk] == ord("\n")) + i for i in range(0, len(data), chunk)]
  )
  if len(data) and data[-1] != ord("\n"):
    ends = np.append(ends, len(data))
  starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
  keep = ends - starts > 0
  starts, ends = starts[keep], ends[keep].astype(np.int64)
  # Lines holding only whitespace ("\r", spaces) are blank too; few enough to check one by one.
  short = np.flatnonzero(ends - starts < 8)
  blank = [i for i in short if not bytes(data[starts[i] : ends[i]]).strip()]
  if blank:
    keep = np.ones(len(starts), bool)
    keep[blank] = False
    starts, ends = starts[keep], ends[keep]
  return starts, ends


class ImageFolderSource:
  """Random-access records {"image": bytes, "id": file_name, column: value, ...} of an
  imagefolder split (see the module docstring)."""

  def __init__(self, folder: str, split: str = "train"):
    metadata = find_metadata(folder, split)
    if metadata is None:
      raise FileNotFoundError(
        f"{folder}: no metadata.jsonl or metadata.csv for split "
        f"'{split}' (at the folder's root or in {split}/)"
      )
    self.metadata_path = metadata
    self.root = (
      metadata.rsplit("/", 1)[0] if storage.is_remote(metadata) else os.path.dirname(metadata)
    )
    self._name = metadata.rsplit("/", 1)[-1]
    self._reader = None  # local JSON Lines: rows read from the file by offset
    self._blob = None  # otherwise: the rows as JSON text in memory
    if metadata.endswith(".jsonl") and not storage.is_remote(metadata):
      data = (
        np.memmap(metadata, np.uint8, mode="r")
        if os.path.getsize(metadata)
        else np.zeros(0, np.uint8)
      )
      self._starts, self._ends = _line_offsets(data)
      del data
      self._reader = paths.RangeReader(metadata)
    else:
      self._blob, self._starts, self._ends = self._parse_whole(paths.read_bytes(metadata))
    if not len(self._starts):
      raise ValueError(f"{metadata}: no rows in it")
    self.columns = self._first_columns()

  def _parse_whole(self, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows as JSON text, starts, ends) of a whole metadata file."""
    if self._name.endswith(".jsonl"):
      blob = np.frombuffer(data, np.uint8)
      return (blob, *_line_offsets(blob))
    try:
      reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
      rows = [json.dumps(row, ensure_ascii=False).encode() for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
      raise ValueError(f"{self.metadata_path}: not a readable CSV file ({e})") from None
    if reader.fieldnames is None or FILE_NAME not in reader.fieldnames:
      raise ValueError(
        f"{self.metadata_path}: no '{FILE_NAME}' column in its header "
        f"({reader.fieldnames or 'empty file'})"
      )
    lengths = np.asarray([len(r) for r in rows], np.int64)
    ends = np.cumsum(lengths)
    return np.frombuffer(b"".join(rows), np.uint8), ends - lengths, ends

  def _first_columns(self) -> tuple[str, ...]:
    """The columns of the first row that parses (what the pipeline checks its keys against)."""
    for index in range(min(len(self), 100)):
      row = self._row(index)
      if isinstance(row, dict):
        if FILE_NAME not in row:
          raise ValueError(
            f"{self.metadata_path}: no '{FILE_NAME}' in row {index} (has "
            f"{sorted(row)}); imagefolder metadata names each image there"
          )
        return tuple(row)
    raise ValueError(f"{self.metadata_path}: none of its first rows is a JSON object")

  def _row(self, index: int) -> dict[str, Any] | str:
    """Row `index` as a dict, or why it is not one."""
    start, end = int(self._starts[index]), int(self._ends[index])
    text = (
      self._reader.read(start, end - start)
      if self._reader is not None
      else self._blob[start:end].tobytes()
    )
    try:
      row = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return f"{self._name} row {index} (byte {start}) is not valid JSON ({e})"
    if not isinstance(row, dict):
      return f"{self._name} row {index} (byte {start}) is not a JSON object"
    return row

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> dict[str, Any]:
    row = self._row(int(index))
    if isinstance(row, str):
      return {"id": f"row {index}", "image": Unreadable(row)}
    record = {column: None for column in self.columns}  # a missing caption does not decode
    record.update(row)
    name = row.get(FILE_NAME)
    record["id"] = str(row.get("id", name if isinstance(name, str) else f"row {index}"))
    record["image"] = self._image(name)
    return record

  def _image(self, name) -> bytes | Unreadable:
    if not isinstance(name, str) or not name:
      return Unreadable(f"'{FILE_NAME}' is missing or not a string")
    normal = posixpath.normpath(name.replace(os.sep, "/"))
    if normal.startswith(("/", "../")) or normal == ".." or os.path.isabs(name):
      return Unreadable(f"'{FILE_NAME}' {name!r} leaves the dataset folder; it is not read")
    path = paths.join(self.root, normal)
    try:
      return paths.read_bytes(path)
    except FileNotFoundError:
      return Unreadable(f"{path}: missing")
    except OSError as e:
      return Unreadable(f"{path}: unreadable ({e.strerror or e})")

  @property
  def remote(self) -> bool:
    return storage.is_remote(self.root)

  @property
  def features(self) -> dict[str, None]:
    """The record's keys (what DataSpec.image_key / caption_key are checked against)."""
    return {key: None for key in ("image", "id", *self.columns)}

  @property
  def metadata(self) -> dict[str, Any]:
    return {}

  def describe(self) -> str:
    return f"imagefolder {self.metadata_path}: {len(self)} rows, columns {list(self.columns)}"
