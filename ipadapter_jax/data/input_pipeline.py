"""Data sources -> globally shuffled, per-host sharded batches of `jax.Array`s (grain).

`open_source` tells the formats apart by what `data.source` names: an embedding cache folder
(cache.json), an imagefolder (metadata.jsonl / metadata.csv), webdataset tar shards (a folder of
.tar files or a pattern of them), a built TFDS folder or a TFDS dataset name. Every one but the
shards is random access and goes through the grain pipeline below; shards are a stream
(streaming.py), resumable exactly as well.

The whole stream is one grain `MapDataset`: shuffled over all examples with `seed` (a new
permutation each epoch), preprocessed with the example's stream position as its index (so a
random crop depends only on seed and position), dealt round-robin to the processes, and batched.
Batch k of a process is a pure function of (seed, k), so the iterator state is the number of
batches handed out and restoring it continues with exactly the next batch, with or without
worker processes.

A record whose image (or caption) does not decode is skipped: the example is made from the next
record of the stream instead, so every batch stays whole (on every process) and is still a pure
function of (seed, k). The iterator counts the skips (`skipped_records`, kept in its state) and
stops the run, naming the record, once more than `max_bad_records` have been skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding
from PIL import Image

from ipadapter_jax import storage
from ipadapter_jax.data import cache_files, imagefolder, paths, tar_shards
from ipadapter_jax.data.image_text import resolve_dataset_dir
from ipadapter_jax.data.paths import Unreadable
from ipadapter_jax.preprocessing import (
  CLIPImageConfig,
  clip_pixels,
  decode_image_file,
  shortest_side_size,
  to_rgb,
  vae_pixels,
)
from ipadapter_jax.tokenizer import tokenize

# Keys of an embedding-cache record (see cache.py) that become batch arrays.
CACHED_KEYS = (
  "latent_mean",
  "latent_logvar",
  "image_embeds",
  "image_hidden_states",
  "text_context",
  "text_pooled",
  "time_ids",
)
STATE_FORMAT = "ipadapter_jax.TrainIterator/1"
# Per-example entry of a raw batch that the iterator takes out: the example's stream position
# when its own record did not decode (and the next one that did took its place), else -1.
SKIPPED_KEY = "skipped_position"


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the trainer asks of the raw examples."""

  resolution: int  # VAE pixel size (square)
  random_crop: bool  # centre crop if False
  clip: CLIPImageConfig | None  # None = no CLIP pixels
  tokenizer: Any  # transformers CLIPTokenizer; None = no captions (a VAE)
  tokenizer_2: Any = None  # SDXL's second tokenizer
  image_key: str = "image"  # feature keys; "a/b" reaches into nested features
  caption_key: str = "text"


# ---------------------------------------------------------------------------------------------
# Sources


# The sources this package reads itself (the others are TFDS's): each says its features.
_OWN_SOURCES = (cache_files.CacheSource, imagefolder.ImageFolderSource, tar_shards.WebDatasetSource)


def source_format(path_or_name: str) -> str:
  """What `data.source` names: "cache", "imagefolder", "webdataset" or "tfds" (a built folder
  or a dataset name)."""
  if not path_or_name:
    raise ValueError("data.source is empty: give a dataset folder, shards or a TFDS name")
  storage.check_path(path_or_name, "data.source")
  if tar_shards.is_pattern(path_or_name) or path_or_name.endswith(".tar"):
    if not path_or_name.endswith(".tar"):
      raise ValueError(f"{path_or_name}: a pattern names webdataset shards, which end in .tar")
    return "webdataset"
  if paths.isdir(path_or_name):
    if cache_files.is_cache_folder(path_or_name):
      return "cache"
    if imagefolder.has_metadata(path_or_name):
      return "imagefolder"
    if tar_shards.looks_like_shards(path_or_name):
      return "webdataset"
  if storage.is_remote(path_or_name):
    raise FileNotFoundError(
      f"{path_or_name}: no embedding cache (cache.json), imagefolder (metadata.jsonl/csv) or "
      ".tar shards there; a built TFDS dataset is read from local disk only (copy it there)"
    )
  return "tfds"


def open_source(path_or_name: str, *, split: str = "train", data_dir: str | None = None):
  """The source `data.source` names (see `source_format`), local or at a gs:// URI (TFDS
  datasets: local only): random access (len + getitem) for grain, or a WebDatasetSource.

  Image features come back as encoded bytes, decoded by the pipeline with PIL. TFDS datasets
  stored as tfrecord are converted to ArrayRecord first, which needs TensorFlow. `split` picks
  an imagefolder's split subfolder or a TFDS split.
  """
  kind = source_format(path_or_name)
  if kind == "cache":
    return cache_files.CacheSource(path_or_name)
  if kind == "imagefolder":
    return imagefolder.ImageFolderSource(path_or_name, split)
  if kind == "webdataset":
    return tar_shards.WebDatasetSource(path_or_name)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  if os.path.isdir(path_or_name):
    builder = tfds.builder_from_directory(resolve_dataset_dir(path_or_name))
  elif os.sep in path_or_name and data_dir is None:
    raise FileNotFoundError(f"{path_or_name}: no such dataset folder")
  else:
    try:
      builder = tfds.builder(path_or_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise FileNotFoundError(
        f"{path_or_name}: no such folder, and no TFDS dataset of that "
        f"name in {data_dir or 'the default data_dir'}"
      ) from None
    if not builder.is_prepared():
      raise FileNotFoundError(
        f"{path_or_name}: not prepared in {builder.data_dir}; build it first (as ArrayRecord: "
        f"tfds build {path_or_name} --file_format=array_record)"
      )
  decoders = {
    key: tfds.decode.SkipDecoding()
    for key, feature in builder.info.features.items()
    if isinstance(feature, tfds.features.Image)
  }
  try:
    return builder.as_data_source(split=split, decoders=decoders or None)
  except NotImplementedError:  # stored without random access (tfrecord)
    return _convert_with_tensorflow(builder, split, decoders)


def _convert_with_tensorflow(builder, split: str, decoders):
  """The tf.data route: converts a tfrecord dataset to ArrayRecord in place, then opens it."""
  # pylint: disable=import-outside-toplevel,unused-import
  import tensorflow_datasets as tfds

  file_format = builder.info.file_format.value if builder.info.file_format else "unknown"
  try:
    import tensorflow  # noqa: F401  # only whether it is installed
  except ImportError:
    raise RuntimeError(
      f"{builder.data_dir}: stored as {file_format}, which only TensorFlow reads; install it "
      "(pip install -e '.[tf]') so it can be converted to ArrayRecord, or rebuild the dataset "
      "with file_format='array_record'"
    ) from None
  from tensorflow_datasets.scripts.cli import convert_format_utils

  print(f"{builder.data_dir}: converting {file_format} to array_record (once, in place)")
  convert_format_utils.convert_dataset(
    out_dir=None,
    out_file_format="array_record",
    dataset_version_dir=str(builder.data_dir),
    num_workers=1,
  )
  builder = tfds.builder_from_directory(str(builder.data_dir))
  return builder.as_data_source(split=split, decoders=decoders or None)


def source_features(source) -> dict[str, Any]:
  """{feature key: TFDS feature or None} of a source, from its dataset info or its first record."""
  if isinstance(source, _OWN_SOURCES):
    return dict(source.features)
  info = getattr(source, "dataset_info", None)
  if info is not None:
    return dict(info.features.items())
  if len(source) == 0:
    return {}
  return {key: None for key in source[0]}


def source_metadata(source) -> dict[str, Any]:
  """The dataset's TFDS metadata (the embedding cache's settings), or {}."""
  if isinstance(source, _OWN_SOURCES):
    return dict(source.metadata)
  info = getattr(source, "dataset_info", None)
  return dict(info.metadata or {}) if info is not None else {}


def is_cached(source) -> bool:
  """Whether a source holds embedding-cache records rather than images and captions."""
  return "latent_mean" in source_features(source)


# ---------------------------------------------------------------------------------------------
# Per-example preprocessing


def lookup(record: dict[str, Any], key: str, index: int):
  """record[key], with "a/b" for nested features; names the key when it is missing."""
  value = record
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      raise KeyError(f"example {index}: no feature '{key}' (has {sorted(record)})")
    value = value[part]
  return value


def decode_image(value, where: str = "image") -> Image.Image:
  """Encoded bytes, a uint8 [H, W(, C)] array or a PIL image -> a PIL image."""
  if isinstance(value, Image.Image):
    return value
  if isinstance(value, Unreadable):  # the source could not read it
    raise ValueError(f"{where}: {value.reason}")
  if isinstance(value, (bytes, np.bytes_)):
    return decode_image_file(value, where)  # an ImageFileError (a ValueError) when it fails
  array = np.asarray(value)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise ValueError(
      f"{where}: expected encoded bytes or a uint8 image array, got {array.dtype} {array.shape}"
    )
  return Image.fromarray(array)


def decode_text(value, where: str = "text") -> str:
  """A caption as str (TFDS gives bytes or str)."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, str):
    return value
  raise ValueError(f"{where}: expected a string caption, got {type(value).__name__}")


def crop_offsets(
  width: int, height: int, resolution: int, rng: np.random.Generator | None
) -> tuple[int, int]:
  """(top, left) of the crop in the resized image: centred as torchvision rounds, or random."""
  resized_w, resized_h = shortest_side_size(width, height, resolution)
  if rng is None:
    return (int(round((resized_h - resolution) / 2.0)), int(round((resized_w - resolution) / 2.0)))
  return (
    int(rng.integers(0, resized_h - resolution + 1)),
    int(rng.integers(0, resized_w - resolution + 1)),
  )


def crop_pixels(image: Image.Image, resolution: int, top: int, left: int) -> np.ndarray:
  """vae_pixels with the crop at (top, left) of the resized image instead of the centre."""
  image = to_rgb(image)
  image = image.resize(
    shortest_side_size(image.width, image.height, resolution), resample=Image.Resampling.BILINEAR
  )
  array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.float32)
  return (array / 255.0 - 0.5) / 0.5


@dataclasses.dataclass(frozen=True)
class RawExample:
  """(stream index, image-text record) -> the raw batch entries of one example.

  Without `records`, a record that does not decode raises a ValueError naming it. With
  `records` (the stream of records this transform is mapped over) and `indices` (their indices
  in the source), it is replaced by the next record of the stream that decodes, looking at most
  max_bad_records + 1 ahead, and the example's SKIPPED_KEY holds its position.
  """

  spec: DataSpec
  seed: int
  records: Any = None
  indices: Any = None
  max_bad_records: int = 0

  def decode(self, position: int, record: dict[str, Any]) -> tuple[Image.Image, str]:
    """(image, caption) of a record; ValueError naming it when either does not decode."""
    where = f"example {position}"
    try:
      image = lookup(record, self.spec.image_key, position)
      caption = lookup(record, self.spec.caption_key, position)
    except KeyError as e:  # a record without the key (the source has it): skipped like others
      raise ValueError(e.args[0]) from None
    return decode_image(image, where), decode_text(caption, where)

  def __call__(self, index: int, record: dict[str, Any]) -> dict[str, np.ndarray]:
    if self.records is None:
      return self._example(index, *self.decode(index, record))
    try:
      decoded, skipped = self.decode(index, record), -1
    except ValueError:
      skipped = index  # counted here only: a record passed over below counts at its own slot
      for position in range(index + 1, index + 2 + self.max_bad_records):
        try:  # grain's stream continues past the last epoch
          decoded = self.decode(position, self.records[position])
          break
        except ValueError:
          continue
      else:
        raise ValueError(
          f"{self.describe(index)}; neither does any of the "
          f"{self.max_bad_records + 1} records after it in the stream, more than "
          f"max_bad_records={self.max_bad_records}"
        ) from None
    return dict(self._example(index, *decoded), **{SKIPPED_KEY: np.int64(skipped)})

  def describe(self, position: int) -> str:
    """Names the record at a stream position (source index, id) and why it does not decode."""
    record = self.records[position]
    names = [f"stream position {position}"]
    if self.indices is not None:
      names.append(f"source record {self.indices[position]}")
    if isinstance(record, dict) and "id" in record:
      names.append(f"id {decode_text(record['id'])!r}")
    try:
      self.decode(position, record)
      problem = "decodes when read again"
    except ValueError as e:
      problem = str(e).removeprefix(f"example {position}: ")
    return f"{', '.join(names)}: {problem}"

  def _example(self, index: int, image: Image.Image, caption: str) -> dict[str, np.ndarray]:
    spec, R = self.spec, self.spec.resolution
    width, height = image.size
    # A generator per (seed, stream position): a restored iterator crops exactly the same.
    rng = np.random.default_rng([self.seed, index]) if spec.random_crop else None
    top, left = crop_offsets(width, height, R, rng)
    pixels = crop_pixels(image, R, top, left) if rng is not None else vae_pixels(image, R)
    out = {"pixels": pixels, "time_ids": np.asarray([height, width, top, left, R, R], np.float32)}
    if spec.tokenizer is not None:
      out["input_ids"] = tokenize(spec.tokenizer, caption)[0]
    if spec.tokenizer_2 is not None:
      out["input_ids_2"] = tokenize(spec.tokenizer_2, caption)[0]
    if spec.clip is not None:
      out["clip_pixels"] = clip_pixels([image], spec.clip)[0]
    return out


@dataclasses.dataclass(frozen=True)
class CachedExample:
  """(stream index, embedding-cache record) -> its batch entries (float32)."""

  keys: tuple[str, ...]

  def __call__(self, index: int, record: dict[str, Any]) -> dict[str, np.ndarray]:
    del index
    return {key: np.asarray(record[key], np.float32) for key in self.keys}


def example_transform(
  source, spec: DataSpec, seed: int, records=None, indices=None, max_bad_records: int = 0
):
  """The per-example transform for a source: RawExample (skipping undecodable records of
  `records`, when given), or CachedExample for a cache."""
  features = source_features(source)
  if "latent_mean" in features:
    if spec.random_crop:
      raise ValueError(
        "an embedding cache holds one centre crop per image; use random_crop=False with it"
      )
    cached_resolution = source_metadata(source).get("resolution")
    if cached_resolution is not None and cached_resolution != spec.resolution:
      raise ValueError(
        f"the embedding cache was made at resolution {cached_resolution}, "
        f"the spec asks for {spec.resolution}"
      )
    return CachedExample(tuple(k for k in CACHED_KEYS if k in features))
  for key in (spec.image_key, spec.caption_key):
    if features and key.split("/")[0] not in features:
      raise KeyError(
        f"the source has no feature '{key}' (it has {sorted(features)}); set "
        "DataSpec.image_key / caption_key"
      )
  return RawExample(spec, seed, records, indices, max_bad_records)


# ---------------------------------------------------------------------------------------------
# Global batches


def ordered_map(
  submit: Callable[[Any], Future], items: Iterable, window: int
) -> Iterator[tuple[Any, Any]]:
  """(item, result) for each item, in order, where `submit(item)` starts its work in a pool:
  at most `window` items are in flight."""
  pending = collections.deque()
  try:
    for item in items:
      pending.append((item, submit(item)))
      if len(pending) >= window:
        done, future = pending.popleft()
        yield done, future.result()
    while pending:
      done, future = pending.popleft()
      yield done, future.result()
  finally:
    for _, future in pending:
      future.cancel()


class TrainIterator:
  """Global batches ({key: jax.Array} sharded over the batch axes), resumable exactly.

  When process_index/process_count are simulated (differ from JAX's), each array holds only
  this process's share of the global batch.

  `skipped_records` counts the examples of this process's batches whose record did not decode,
  and is part of the state; once it passes `max_bad_records`, the batch raises a ValueError
  naming the record (`describe`). With several processes each counts (and limits) its own share,
  without communication; a state saved by one process restores its count on all.
  """

  def __init__(
    self,
    batches: grain.MapDataset,
    *,
    sharding: NamedSharding,
    global_batch_size: int,
    worker_count: int,
    num_threads: int,
    config: dict[str, Any],
    real_processes: bool,
    max_bad_records: int = 0,
    describe: Callable[[int], str] | None = None,
  ):
    self._batches = batches
    self._sharding = sharding
    self._global_batch_size = global_batch_size
    self._worker_count = worker_count
    self._num_threads = num_threads
    self._config = config
    self._real_processes = real_processes
    self._max_bad_records = max_bad_records
    self._describe = describe
    self._skipped = 0
    self._step = 0
    self._iterator = None

  def __iter__(self):
    return self

  def _open(self):
    """A grain iterator over the batches from the current step on."""
    ds = self._batches[self._step :].to_iter_dataset(
      grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=self._num_threads)
    )
    if self._worker_count > 0:
      _mark_absl_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
    return iter(ds)

  def _next_batch(self) -> dict[str, np.ndarray]:
    """The next local batch as grain gives it (in shared memory with worker processes)."""
    if self._iterator is None:
      self._iterator = self._open()
    batch = next(self._iterator)
    self._step += 1
    positions = batch.pop(SKIPPED_KEY, None)
    if positions is not None:
      for position in np.asarray(positions)[np.asarray(positions) >= 0]:
        self._skipped += 1
        if self._skipped > self._max_bad_records:
          named = self._describe(int(position)) if self._describe else f"stream position {position}"
          raise ValueError(
            f"{self._skipped} records skipped as undecodable, more than "
            f"max_bad_records={self._max_bad_records}; the last: {named}"
          )
    return batch

  def next_local(self) -> dict[str, np.ndarray]:
    """This process's part of the next batch, as numpy arrays."""
    # Copies out of grain's shared memory, which must not outlive the iterator.
    return {key: np.array(value) for key, value in self._next_batch().items()}

  def __next__(self) -> dict[str, jax.Array]:
    local = self._next_batch()
    return {key: self._to_global(value) for key, value in local.items()}

  def _to_global(self, local: np.ndarray) -> jax.Array:
    """One process's rows -> the global array, sharded along the batch axes."""
    shape = (self._global_batch_size,) + local.shape[1:] if self._real_processes else None
    with jax.transfer_guard_host_to_device("allow"):  # the one deliberate copy of each batch
      return jax.make_array_from_process_local_data(self._sharding, local, shape)

  @property
  def step(self) -> int:
    """How many batches this iterator has handed out."""
    return self._step

  @property
  def skipped_records(self) -> int:
    """Undecodable records passed over in this process's batches so far (restored with the
    state)."""
    return self._skipped

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable state; set_state(state) continues with exactly the next batch."""
    return {
      "format": STATE_FORMAT,
      "step": self._step,
      "skipped_records": self._skipped,
      "config": dict(self._config),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a get_state() of an iterator over the same data with the same settings."""
    if state.get("format") != STATE_FORMAT:
      raise ValueError(
        f"not a TrainIterator state (format {state.get('format')!r}, expected {STATE_FORMAT!r})"
      )
    changed = {
      k: (v, self._config.get(k)) for k, v in state["config"].items() if self._config.get(k) != v
    }
    if changed:
      detail = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
      raise ValueError(f"iterator state does not fit this data pipeline ({detail})")
    self.close()
    self._step = int(state["step"])
    # States saved before skips were counted hold none.
    self._skipped = int(state.get("skipped_records", 0))

  def close(self) -> None:
    """Stops worker processes and prefetch threads (reopened on the next batch)."""
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None


def _mark_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; mark them parsed when no absl app did."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def mesh_batch_axes(mesh: jax.sharding.Mesh, batch_axes: Sequence[str]) -> tuple[str, ...]:
  """Those of `batch_axes` the mesh has (a data-only mesh needs no "fsdp" axis)."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(
      f"none of the batch axes {tuple(batch_axes)} is a mesh axis {tuple(mesh.axis_names)}"
    )
  return axes


def grain_iterator(
  source,
  spec: DataSpec,
  *,
  global_batch_size: int,
  sharding: NamedSharding,
  seed: int,
  process_index: int,
  process_count: int,
  num_epochs: int | None,
  worker_count: int,
  num_threads: int,
  max_bad_records: int,
) -> TrainIterator:
  """The grain pipeline of a random-access source (arguments checked by
  `batches.make_train_iterator`)."""
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError("the source has no examples")
  local_batch = global_batch_size // process_count

  records = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
  # The same permutation of the source's indices: grain's shuffle depends on seed and length.
  indices = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(num_epochs)
  transform = example_transform(source, spec, seed, records, indices, max_bad_records)
  stream = records.map_with_index(transform)  # index = position in the global stream
  if num_epochs is not None:  # every process gets the same number of whole batches
    stream = stream[: len(stream) // global_batch_size * global_batch_size]
  # Global batch b is chunks b*P .. b*P+P-1 of the stream cut into local-size chunks, and
  # process i takes chunk b*P+i: the global batches (and the iterator state) are the same
  # whatever the number of processes, so a run resumes on any number of hosts.
  batches = stream.batch(local_batch, drop_remainder=True)[process_index::process_count]
  config = dict(
    num_examples=num_examples, seed=seed, global_batch_size=global_batch_size, num_epochs=num_epochs
  )
  return TrainIterator(
    batches,
    sharding=sharding,
    global_batch_size=global_batch_size,
    worker_count=worker_count,
    num_threads=num_threads,
    config=config,
    real_processes=process_count == jax.process_count(),
    max_bad_records=max_bad_records,
    describe=transform.describe if isinstance(transform, RawExample) else None,
  )
