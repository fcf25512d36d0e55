"""The embedding cache's files: fixed-size rows in part files, written by many hosts at once,
read with random access from local disk or gs://.

A cache folder holds
  part-NNNNN.rows   the examples of one part, each a row of its arrays' bytes, back to back
  part-NNNNN.json   the part's example count and row layout, written once its rows are whole
  empty_text.npz    the empty caption's text states (float32), for condition dropout
  cache.json        the index: layout, settings and every part in order, written last
Every example has the same shapes, so example i of a part is the byte range
[i * row_bytes, (i + 1) * row_bytes) of its rows file: one read (one ranged request on an
object store) per example. Arrays are float32, or bfloat16 (half the size; `time_ids`, whose
image sizes bfloat16 cannot hold exactly, stay float32) and upcast to float32 when batched.

Parts are numbered in source order and written by whichever host owns them, so the cache is the
same whatever the number of hosts that built it. A part whose json exists is complete: a build
run again skips it. Whoever finds every part complete writes the index (the same bytes whoever
does), so the hosts never wait for each other.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterable

import ml_dtypes
import numpy as np

from ipadapter_jax import storage
from ipadapter_jax.data import paths

INDEX_FILE = "cache.json"
EMPTY_TEXT_FILE = "empty_text.npz"
FORMAT = "ipadapter_jax.EmbeddingCache/2"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
FLOAT32_KEYS = ("time_ids",)  # kept exact in a bfloat16 cache


def part_name(part: int) -> str:
  return f"part-{part:05d}"


def is_cache_folder(folder: str) -> bool:
  return paths.isfile(paths.join(folder, INDEX_FILE))


class RowLayout:
  """How an example's arrays sit in a row: in key order, each at its dtype, back to back."""

  def __init__(self, fields: dict[str, tuple[tuple[int, ...], str]]):
    self.fields = {key: (tuple(shape), dtype) for key, (shape, dtype) in sorted(fields.items())}
    self._slices = {}
    start = 0
    for key, (shape, dtype) in self.fields.items():
      size = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
      self._slices[key] = (start, size)
      start += size
    self.row_bytes = start

  @classmethod
  def for_shapes(cls, shapes: dict[str, tuple[int, ...]], dtype: str) -> "RowLayout":
    if dtype not in DTYPES:
      raise ValueError(f"cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return cls(
      {key: (shape, "float32" if key in FLOAT32_KEYS else dtype) for key, shape in shapes.items()}
    )

  def to_json(self) -> dict[str, Any]:
    return {key: [list(shape), dtype] for key, (shape, dtype) in self.fields.items()}

  @classmethod
  def from_json(cls, fields: dict[str, Any]) -> "RowLayout":
    return cls({key: (tuple(shape), dtype) for key, (shape, dtype) in fields.items()})

  def encode(self, example: dict[str, np.ndarray]) -> bytes:
    """One example's arrays as a row (cast to the layout's dtypes)."""
    parts = []
    for key, (shape, dtype) in self.fields.items():
      value = np.asarray(example[key])
      if value.shape != shape:
        raise ValueError(f"cache row: '{key}' has shape {value.shape}, the layout {shape}")
      parts.append(np.ascontiguousarray(value.astype(DTYPES[dtype])).tobytes())
    return b"".join(parts)

  def decode(self, row: bytes) -> dict[str, np.ndarray]:
    """A row's arrays (bfloat16 ones stay bfloat16: the pipeline upcasts)."""
    out = {}
    for key, (shape, dtype) in self.fields.items():
      start, size = self._slices[key]
      out[key] = np.frombuffer(row, DTYPES[dtype], size // DTYPES[dtype].itemsize, start).reshape(
        shape
      )
    return out


class PartWriter:
  """Writes one part: rows streamed to `part-NNNNN.rows` (locally under a temporary name), then
  the part's json, which marks it complete."""

  def __init__(self, folder: str, part: int, layout: RowLayout):
    self.folder, self.part, self.layout = folder, part, layout
    self._path = paths.join(folder, part_name(part) + ".rows")
    # An object store shows the object only once it is closed; a local file is renamed then.
    self._writing = self._path if storage.is_remote(folder) else self._path + ".partial"
    paths.makedirs(folder)
    self._file = paths.open_write(self._writing)
    self.count = 0

  def write(self, example: dict[str, np.ndarray]) -> None:
    self._file.write(self.layout.encode(example))
    self.count += 1

  def finish(self, extra: dict[str, Any] | None = None) -> None:
    self._file.close()
    if self._writing != self._path:
      paths.rename(self._writing, self._path)
    info = {"num_examples": self.count, "layout": self.layout.to_json(), **(extra or {})}
    paths.write_bytes(
      paths.join(self.folder, part_name(self.part) + ".json"), json.dumps(info, indent=1).encode()
    )

  def abandon(self) -> None:
    """Closes and deletes what was written (a failed part leaves nothing)."""
    try:
      self._file.close()
    finally:
      paths.remove(self._writing)


def write_empty_part(folder: str, part: int, extra: dict[str, Any]) -> dict[str, Any]:
  """Marks a part complete that holds no example (none of its records decoded)."""
  info = {"num_examples": 0, "layout": None, **extra}
  paths.write_bytes(paths.join(folder, part_name(part) + ".json"), json.dumps(info).encode())
  return info


def part_done(folder: str, part: int) -> dict[str, Any] | None:
  """A complete part's json, or None."""
  path = paths.join(folder, part_name(part) + ".json")
  if not paths.isfile(path):
    return None
  return json.loads(paths.read_bytes(path))


def write_index_when_complete(
  folder: str, num_parts: int, settings: dict[str, Any], name: str
) -> bool:
  """Writes cache.json once every part (and empty_text.npz) is complete; returns whether the
  cache is complete. Safe to call from every host: all write the same bytes."""
  names = set(paths.listdir(folder)) if paths.isdir(folder) else set()
  if EMPTY_TEXT_FILE not in names or any(
    part_name(p) + ".json" not in names for p in range(num_parts)
  ):
    return False
  parts, layouts = [], set()
  for part in range(num_parts):
    info = part_done(folder, part)
    if info["layout"] is not None:
      layouts.add(json.dumps(info["layout"], sort_keys=True))
    parts.append(
      {
        "file": part_name(part) + ".rows",
        "num_examples": info["num_examples"],
        "skipped": len(info.get("skipped", [])),
      }
    )
  if len(layouts) != 1:
    raise ValueError(
      f"{folder}: its parts hold rows of different layouts (made with "
      "different settings?); remove the folder and build it again"
      if layouts
      else f"{folder}: not one record of the source decoded"
    )
  index = {
    "format": FORMAT,
    "name": name,
    "num_examples": sum(p["num_examples"] for p in parts),
    "layout": json.loads(layouts.pop()),
    "settings": settings,
    "parts": parts,
  }
  paths.write_bytes(paths.join(folder, INDEX_FILE), json.dumps(index, indent=1).encode())
  return True


def write_empty_text(folder: str, arrays: dict[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **{key: np.asarray(value, np.float32) for key, value in arrays.items()})
  paths.makedirs(folder)
  paths.write_bytes(paths.join(folder, EMPTY_TEXT_FILE), buffer.getvalue())


def read_empty_text(folder: str) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(paths.read_bytes(paths.join(folder, EMPTY_TEXT_FILE)))) as data:
    return {key: data[key] for key in data.files}


class CacheSource:
  """Random-access examples {key: array} of a cache folder, local or remote; picklable."""

  def __init__(self, folder: str):
    self.folder = folder
    try:
      self.index = json.loads(paths.read_bytes(paths.join(folder, INDEX_FILE)))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{folder}/{INDEX_FILE}: not readable ({e})") from None
    if self.index.get("format") != FORMAT:
      raise ValueError(
        f"{folder}/{INDEX_FILE}: format {self.index.get('format')!r}, expected {FORMAT!r}"
      )
    self.layout = RowLayout.from_json(self.index["layout"])
    parts = self.index["parts"]
    self._readers = [paths.RangeReader(paths.join(folder, p["file"])) for p in parts]
    self._ends = np.cumsum([p["num_examples"] for p in parts], dtype=np.int64)

  @property
  def remote(self) -> bool:
    return storage.is_remote(self.folder)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"example {index} of a cache of {len(self)}")
    part = int(np.searchsorted(self._ends, index, side="right"))
    row = index - (int(self._ends[part - 1]) if part else 0)
    size = self.layout.row_bytes
    return self.layout.decode(self._readers[part].read(row * size, size))

  @property
  def features(self) -> dict[str, None]:
    return {key: None for key in self.layout.fields}

  @property
  def metadata(self) -> dict[str, Any]:
    return dict(self.index["settings"])

  def describe(self) -> str:
    dtypes = sorted({dtype for _, dtype in self.layout.fields.values()})
    return (
      f"embedding cache {self.folder}: {len(self)} examples in "
      f"{len(self.index['parts'])} parts, {self.layout.row_bytes:,} bytes each "
      f"({'/'.join(dtypes)})"
    )


def example_bytes(shapes: dict[str, tuple[int, ...]], dtype: str) -> int:
  """Bytes per example of a cache with these shapes at `dtype`."""
  return RowLayout.for_shapes(shapes, dtype).row_bytes


def write_examples(
  folder: str,
  examples: Iterable[dict[str, np.ndarray]],
  shapes: dict[str, tuple[int, ...]],
  *,
  dtype: str = "float32",
  settings: dict[str, Any],
  empty_text: dict[str, np.ndarray] | None = None,
  examples_per_part: int = 4096,
  name: str = "embedding_cache",
) -> str:
  """Writes ready-made examples as a complete cache (one host); returns the folder."""
  layout = RowLayout.for_shapes(shapes, dtype)
  writer, part = None, 0
  for example in examples:
    if writer is None:
      writer = PartWriter(folder, part, layout)
    writer.write(example)
    if writer.count == examples_per_part:
      writer.finish()
      writer, part = None, part + 1
  if writer is not None:
    writer.finish()
    part += 1
  write_empty_text(folder, empty_text or {})
  write_index_when_complete(folder, part, settings, name)
  return folder
