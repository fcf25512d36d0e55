"""Webdataset tar shards (as img2dataset writes them), listed and read record by record.

A shard is a tar file whose members are grouped into records by key: `KEY.jpg`, `KEY.txt` and
`KEY.json` (consecutive members whose names agree up to the first dot of the file name) make
one record. Shards are given as a folder of `.tar` files, a brace pattern
(`shards/{00000..00099}.tar`, `{a,b}`), a glob pattern (`shards/*.tar`) or one `.tar` file, on
local disk or at a `gs://` (or `s3://`) URI.

A record becomes {"image": bytes of its jpg/jpeg/png/webp member, "text": its txt member,
"json": its json member parsed, "id": its key, EXT: bytes for any other member}; what it lacks
is None (an image it lacks does not decode, so the pipeline skips the record and counts it).
Every record is addressed by (shard, byte offset of its first header), so a reader can start at
any record, which is what makes a stream over shards resumable without reading it again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tarfile
from typing import Any, Iterator

from ipadapter_jax import storage
from ipadapter_jax.data import paths
from ipadapter_jax.data.paths import Unreadable

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_GLOB = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
  """Every name a brace pattern stands for, in order: `{00000..00003}` counts (zero-padded to
  the first bound's width), `{a,b}` lists; several groups multiply."""
  groups = []
  for match in _BRACES.finditer(pattern):
    body = match.group(1)
    numbers = _RANGE.fullmatch(body)
    if numbers:
      first, last = numbers.groups()
      width = len(first) if first.startswith("0") else 0
      step = 1 if int(last) >= int(first) else -1
      groups.append([str(n).zfill(width) for n in range(int(first), int(last) + step, step)])
    elif "," in body:
      groups.append(body.split(","))
    else:
      raise ValueError(f"{pattern}: '{{{body}}}' is neither a range {{A..B}} nor a list {{a,b}}")
  pieces = _BRACES.split(pattern)[::2]  # the text around the groups
  names = []
  for choice in itertools.product(*groups):
    names.append("".join(p + c for p, c in zip(pieces, choice)) + pieces[-1])
  return names


def is_pattern(source: str) -> bool:
  """Whether `source` names shards by a brace or glob pattern."""
  return bool(_BRACES.search(source) or _GLOB.search(source))


def looks_like_shards(source: str) -> bool:
  """Whether `source` names webdataset shards: a pattern or file ending in .tar, or a folder
  holding .tar files."""
  if source.endswith(".tar"):
    return is_pattern(source) or paths.isfile(source)
  return paths.isdir(source) and any(n.endswith(".tar") for n in paths.listdir(source))


def list_shards(source: str) -> list[str]:
  """The shard paths `source` names (see the module docstring), in order."""
  if _BRACES.search(source):
    shards = [
      s
      for name in expand_braces(source)
      for s in (paths.glob(name) if _GLOB.search(name) else [name])
    ]
  elif _GLOB.search(source):
    shards = paths.glob(source)
  elif source.endswith(".tar"):
    shards = [source]
  elif paths.isdir(source):
    shards = [paths.join(source, n) for n in paths.listdir(source) if n.endswith(".tar")]
  else:
    raise FileNotFoundError(f"{source}: no such folder of .tar shards")
  if not shards:
    raise FileNotFoundError(f"{source}: no .tar shards match it")
  for shard in (shards[0], shards[-1]):  # cheap: the rest are opened as they are reached
    if not paths.isfile(shard):
      raise FileNotFoundError(f"{shard}: no such shard (from {source})")
  return shards


def base_name(path: str) -> str:
  """The file name at the end of a path or URI."""
  return path.rstrip("/").rsplit("/", 1)[-1]


def _split_name(name: str) -> tuple[str, str]:
  """(key, extension) of a member name: the extension starts at the file name's first dot."""
  folder, _, base = name.rpartition("/")
  stem, dot, ext = base.partition(".")
  return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def make_record(key: str, members: dict[str, bytes]) -> dict[str, Any]:
  """The record of one key's members (see the module docstring)."""
  record: dict[str, Any] = {"id": key, "text": members.get("txt")}
  image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
  record["image"] = (
    image
    if image is not None
    else Unreadable(
      f"no image ({', '.join(IMAGE_EXTENSIONS)}) among its files ({sorted(members) or 'none'})"
    )
  )
  record["json"] = None
  if "json" in members:
    try:
      record["json"] = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
      pass  # a caption read from it then does not decode: the record is skipped
  for ext, data in members.items():
    if ext not in record and ext not in IMAGE_EXTENSIONS and ext != "txt":
      record[ext] = data
  return record


def read_records(
  shard: str, offset: int = 0, limit: int | None = None
) -> Iterator[tuple[int, dict[str, Any], int | None]]:
  """(offset, record, offset of the next record) for the records of a shard from `offset` on
  (at most `limit`). Where the shard stops being readable (a truncated or corrupt tar, a
  missing shard), one record that does not decode names the problem, at the offset where the
  unreadable record starts (reading from there fails again), with None as the next offset: the
  rest of the shard is lost."""
  count, start = 0, offset
  try:
    with paths.open_read(shard, block_size=(1 << 20) if limit else (8 << 20)) as f:
      f.seek(offset)
      archive = tarfile.open(fileobj=f, mode="r:")  # reads on from f's position
      key, members = None, {}
      for member in archive:
        name_key, ext = _split_name(member.name)
        if key is not None and name_key != key:
          yield start, make_record(key, members), member.offset
          count += 1
          if limit is not None and count >= limit:
            return
          members = {}
        if key is None or name_key != key:
          key, start = name_key, member.offset
        if member.isfile():
          members[ext] = archive.extractfile(member).read()
      if key is not None:
        yield start, make_record(key, members), archive.offset
  except (tarfile.TarError, OSError, EOFError) as e:
    reason = f"{shard}: unreadable from byte {start} ({type(e).__name__}: {e})"
    yield (
      start,
      {
        "id": f"{base_name(shard)}@{start}",
        "text": None,
        "json": None,
        "image": Unreadable(reason),
      },
      None,
    )


def record_at(shard: str, offset: int) -> dict[str, Any]:
  """The record whose first member's header is at `offset` of the shard."""
  for _, record, _ in read_records(shard, offset, limit=1):
    return record
  return {
    "id": f"{base_name(shard)}@{offset}",
    "text": None,
    "json": None,
    "image": Unreadable(f"{shard}: no record at byte {offset}"),
  }


class WebDatasetSource:
  """A list of tar shards read as streams (no random access, no length): what
  `make_train_iterator` and the embedding cache read webdataset shards through."""

  def __init__(self, source: str):
    self.source = storage.check_path(source, "data.source")
    self.shards = list_shards(self.source)
    first = next(read_records(self.shards[0], limit=1), None)
    if first is None:
      raise ValueError(f"{self.shards[0]}: an empty shard")
    if isinstance(first[1]["image"], Unreadable) and first[2] is None:
      raise ValueError(first[1]["image"].reason)
    self._first_keys = tuple(first[1])

  @property
  def remote(self) -> bool:
    return storage.is_remote(self.source)

  @property
  def features(self) -> dict[str, None]:
    """The keys of the first record (what DataSpec.image_key / caption_key are checked
    against); "text", "json" and "image" are in every record."""
    return {key: None for key in ("image", "text", "json", "id", *self._first_keys)}

  @property
  def metadata(self) -> dict[str, Any]:
    return {}

  def fingerprint(self) -> str:
    """A short hash of the shards' file names: a resumed stream must read the same shards
    (wherever they were moved)."""
    return hashlib.sha256("\n".join(map(base_name, self.shards)).encode()).hexdigest()[:16]

  def describe(self) -> str:
    return f"webdataset {self.source}: {len(self.shards)} shards"
