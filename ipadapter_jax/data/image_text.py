"""Image-text folders (the official IP-Adapter JSON list) -> a TFDS dataset in ArrayRecord files.

The annotation file is the official training list, `[{"image_file": "rel/path.jpg", "text":
"caption"}, ...]`, or JSON Lines with one such object per line; an optional "id" names an
example (the image path otherwise). An image path that leaves the data root (absolute, or through
'..') stops the build before it starts. Images that are missing, unreadable, truncated or corrupt,
or decompression bombs (over PIL's Image.MAX_IMAGE_PIXELS) are skipped, counted and listed in
`build_report.json` beside the dataset. Everything here runs without TensorFlow: images are
checked and, where needed, re-encoded with PIL, and the ArrayRecord files are read back through
`tfds.data_source` / `tfds.builder_from_directory`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import os
import tempfile
import types
import warnings
from typing import Any, Iterator

import tensorflow_datasets as tfds
from PIL import Image
from tqdm import tqdm

from ipadapter_jax.preprocessing import ImageFileError, decode_image_file, to_rgb

DEFAULT_VERSION = "1.0.0"
REPORT_FILE = "build_report.json"


@dataclasses.dataclass(frozen=True)
class BuildReport:
  """What a build wrote and what it skipped."""

  name: str
  version: str
  dataset_dir: str
  num_annotations: int
  num_examples: int
  skipped: list[dict[str, str]]  # {"image_file", "reason"} per skipped annotation

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def skipped_by_kind(self) -> dict[str, int]:
    """{"corrupt": 2, "missing": 1, ...}: the skips counted by the reason's part before ':'."""
    return dict(
      sorted(collections.Counter(s["reason"].split(":")[0] for s in self.skipped).items())
    )

  def to_json(self) -> dict[str, Any]:
    """A JSON-serialisable dict (what build_report.json holds)."""
    return dict(dataclasses.asdict(self), num_skipped=self.num_skipped)


def read_annotations(path: str) -> list[dict[str, Any]]:
  """The entries of a JSON list or JSON Lines annotation file, each checked for its keys."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    try:
      entries = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    where = [f"{path}: entry {i}" for i in range(len(entries))]
  else:  # JSON Lines
    entries, where = [], []
    for number, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        entries.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {number} is not valid JSON ({e})") from None
      where.append(f"{path}: line {number}")
  if not entries:
    raise ValueError(f"{path}: no annotations in it")
  for entry, location in zip(entries, where):
    _check_entry(entry, location)
  return entries


def _check_entry(entry, location: str) -> None:
  """Raises for an entry without a string image_file and text."""
  if not isinstance(entry, dict):
    raise ValueError(
      f"{location} is {type(entry).__name__}, expected an object with 'image_file' and 'text'"
    )
  for key in ("image_file", "text"):
    if not isinstance(entry.get(key), str):
      raise ValueError(f"{location}: '{key}' is missing or not a string")
  if _leaves_root(entry["image_file"]):
    raise ValueError(
      f"{location}: 'image_file' {entry['image_file']!r} leaves the data root "
      "(an absolute path or one through '..'); give a path inside it"
    )
  if "id" in entry and not isinstance(entry["id"], (str, int)):
    raise ValueError(f"{location}: 'id' must be a string or an integer")


def _leaves_root(image_file: str) -> bool:
  """Whether a relative path names a file outside its folder: absolute, or up through '..'."""
  normal = os.path.normpath(image_file)
  return os.path.isabs(normal) or normal == os.pardir or normal.startswith(os.pardir + os.sep)


def load_image_bytes(path: str) -> bytes:
  """The file's bytes when it is an RGB JPEG or PNG; otherwise the image re-encoded as RGB PNG.

  Decodes the whole image, so a file that is not a whole image raises an ImageFileError.
  """
  with open(path, "rb") as f:
    data = f.read()
  with decode_image_file(data, path) as image:
    if image.format in ("JPEG", "PNG") and image.mode == "RGB" and "transparency" not in image.info:
      return data
    buffer = io.BytesIO()
    to_rgb(image).save(buffer, format="PNG")  # lossless, with alpha composited onto white
    return buffer.getvalue()


def _read_one(data_root: str, entry: dict[str, Any]) -> tuple[bytes | None, str]:
  """(image bytes, "") or (None, why it was skipped)."""
  path = os.path.join(data_root, entry["image_file"])
  if not os.path.isfile(path):
    return None, "missing"
  try:
    return load_image_bytes(path), ""
  except ImageFileError as e:
    return None, f"{e.kind}: {e.detail}"
  except OSError as e:  # reading the file
    return None, f"unreadable: {e.strerror or e}"


class ImageTextFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Images and captions listed by an annotation file (or its entries, already read), relative
  to a data root.

  Not registered by class name: `build_image_text_dataset` names each dataset, and reading back
  goes through the files (`tfds.data_source(name, data_dir=...)`), without this class.
  """

  VERSION = tfds.core.Version(DEFAULT_VERSION)
  RELEASE_NOTES = {DEFAULT_VERSION: "Images (RGB JPEG or PNG), captions and ids."}

  def __init__(
    self,
    *,
    annotations: str | list[dict[str, Any]] | None = None,
    data_root: str | None = None,
    num_threads: int = 8,
    **kwargs,
  ):
    self._annotations = annotations
    self._data_root = data_root
    self._num_threads = num_threads
    self.skipped: list[dict[str, str]] = []
    self.num_annotations = 0
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Image-text pairs from an IP-Adapter annotation file.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "text": tfds.features.Text(),
          "id": tfds.features.Text(),
        }
      ),
      disable_shuffling=True,  # keep the annotation order: the input pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    if self._annotations is None or self._data_root is None:
      raise ValueError(f"{self.name}: building needs annotations= and data_root=")
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
    entries = (
      read_annotations(self._annotations)
      if isinstance(self._annotations, str)
      else self._annotations
    )
    self.num_annotations = len(entries)
    self.skipped = []
    chunk = 4 * self._num_threads
    with (
      concurrent.futures.ThreadPoolExecutor(self._num_threads) as pool,
      tqdm(total=len(entries), desc=f"{self.name}: reading images", unit="img") as bar,
    ):
      for start in range(0, len(entries), chunk):  # in chunks: bounded memory, in order
        batch = entries[start : start + chunk]
        results = pool.map(lambda e: _read_one(self._data_root, e), batch)
        for offset, (entry, (data, reason)) in enumerate(zip(batch, results)):
          bar.update(1)
          if data is None:
            self.skipped.append({"image_file": entry["image_file"], "reason": reason})
            continue
          yield (
            start + offset,
            {"image": data, "text": entry["text"], "id": str(entry.get("id", entry["image_file"]))},
          )
        bar.set_postfix(skipped=len(self.skipped))


def _named_builder_class(name: str, version: str) -> type[ImageTextFolder]:
  """An unregistered ImageTextFolder subclass called `name` at `version`."""

  def body(ns):
    ns.update(
      name=name,
      VERSION=tfds.core.Version(version),
      __module__=__name__,
      RELEASE_NOTES={version: ImageTextFolder.RELEASE_NOTES[DEFAULT_VERSION]},
    )

  return types.new_class(
    f"ImageTextFolder_{name}", (ImageTextFolder,), {"skip_registration": True}, body
  )


def build_image_text_dataset(
  annotations: str,
  data_root: str,
  out_dir: str,
  *,
  name: str = "image_text",
  version: str = DEFAULT_VERSION,
  num_threads: int = 8,
) -> BuildReport:
  """Builds `out_dir/name/version/` (ArrayRecord) from an annotation file and returns the report.

  Read it back with `open_source(out_dir)` or `tfds.data_source(name, data_dir=out_dir)`.
  """
  if not os.path.isfile(annotations):
    raise FileNotFoundError(f"{annotations}: no such annotation file")
  if not os.path.isdir(data_root):
    raise FileNotFoundError(f"{data_root}: no such data root folder")
  entries = read_annotations(annotations)  # every entry checked before anything is written
  builder = _named_builder_class(name, version)(
    annotations=entries,
    data_root=data_root,
    num_threads=num_threads,
    data_dir=out_dir,
    file_format="array_record",
  )
  if os.path.isdir(builder.data_dir):
    raise FileExistsError(
      f"{builder.data_dir}: already built; remove it or choose another name/version"
    )
  with tempfile.TemporaryDirectory() as downloads, warnings.catch_warnings():
    # Oversized images are skipped and reported; PIL's warning for each is noise. Set here, in
    # the calling thread, for the reading threads too (the filters are process-wide).
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    builder.download_and_prepare(download_dir=downloads)  # downloads: out of out_dir
  report = BuildReport(
    name=name,
    version=version,
    dataset_dir=str(builder.data_dir),
    num_annotations=builder.num_annotations,
    num_examples=builder.info.splits["train"].num_examples,
    skipped=list(builder.skipped),
  )
  with open(os.path.join(report.dataset_dir, REPORT_FILE), "w") as f:
    json.dump(report.to_json(), f, indent=2)
  return report


def read_build_report(dataset_dir: str) -> dict[str, Any] | None:
  """build_report.json of a built dataset folder, or None when it has none."""
  path = os.path.join(dataset_dir, REPORT_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def resolve_dataset_dir(path: str) -> str:
  """The folder holding dataset_info.json: `path` itself, or the one dataset (newest version)
  below it (`path/name/version` or `path/name/config/version`)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such folder")
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  found = []
  for root, dirs, files in os.walk(path):
    rel = os.path.relpath(root, path)
    level = 0 if rel == "." else rel.count(os.sep) + 1
    # name/version or name/config/version; tfds' unfinished builds start with "incomplete."
    dirs[:] = [d for d in dirs if level < 3 and not d.startswith(("incomplete.", "."))]
    if "dataset_info.json" in files:
      found.append(root)
  if not found:
    raise FileNotFoundError(f"{path}: no TFDS dataset (dataset_info.json) in it or below it")
  parents = {os.path.dirname(d) for d in found}
  if len(parents) > 1:
    raise ValueError(f"{path}: holds several datasets ({', '.join(sorted(found))}); pass one")
  return max(found, key=_version_key)


def _version_key(folder: str):
  """Sort key for a version folder name like 1.10.0 (unparseable names sort first)."""
  try:
    return (1, tuple(int(p) for p in os.path.basename(folder).split(".")))
  except ValueError:
    return (0, ())
