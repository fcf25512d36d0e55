"""Random-access sources -> globally shuffled, per-host sharded batches of `jax.Array`s (grain).

The whole stream is one grain `MapDataset`: shuffled over all examples with `seed` (a new
permutation each epoch), preprocessed with the example's stream position as its index (so a
random crop depends only on seed and position), dealt round-robin to the processes, and batched.
Batch k of a process is a pure function of (seed, k), so the iterator state is the number of
batches handed out and restoring it continues with exactly the next batch, with or without
worker processes.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from ipadapter_jax.data.image_text import resolve_dataset_dir
from ipadapter_jax.preprocessing import (CLIPImageConfig, clip_pixels, shortest_side_size,
                                              to_rgb, vae_pixels)
from ipadapter_jax.tokenizer import tokenize

# Keys of an embedding-cache record (see cache.py) that become batch arrays.
CACHED_KEYS = ("latent_mean", "latent_logvar", "image_embeds", "image_hidden_states",
               "text_context", "text_pooled", "time_ids")
STATE_FORMAT = "ipadapter_jax.TrainIterator/1"


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the trainer asks of the raw examples."""
  resolution: int                # VAE pixel size (square)
  random_crop: bool              # centre crop if False
  clip: CLIPImageConfig | None   # None = no CLIP pixels
  tokenizer: Any                 # transformers CLIPTokenizer; None = no captions (a VAE)
  tokenizer_2: Any = None        # SDXL's second tokenizer
  image_key: str = "image"       # feature keys; "a/b" reaches into nested features
  caption_key: str = "text"


# ---------------------------------------------------------------------------------------------
# Sources


def open_source(path_or_name: str, *, split: str = "train", data_dir: str | None = None):
  """A random-access source (len + getitem) for grain: a built dataset folder (image-text or
  embedding cache), or a prepared TFDS dataset by name (with `data_dir`).

  Image features come back as encoded bytes, decoded by the pipeline with PIL. Datasets stored
  as tfrecord are converted to ArrayRecord first, which needs TensorFlow.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if os.path.isdir(path_or_name):
    builder = tfds.builder_from_directory(resolve_dataset_dir(path_or_name))
  elif os.sep in path_or_name and data_dir is None:
    raise FileNotFoundError(f"{path_or_name}: no such dataset folder")
  else:
    try:
      builder = tfds.builder(path_or_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise FileNotFoundError(f"{path_or_name}: no such folder, and no TFDS dataset of that "
                              f"name in {data_dir or 'the default data_dir'}") from None
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"{path_or_name}: not prepared in {builder.data_dir}; build it first (as ArrayRecord: "
          f"tfds build {path_or_name} --file_format=array_record)")
  decoders = {key: tfds.decode.SkipDecoding() for key, feature in builder.info.features.items()
              if isinstance(feature, tfds.features.Image)}
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
    import tensorflow
  except ImportError:
    raise RuntimeError(
        f"{builder.data_dir}: stored as {file_format}, which only TensorFlow reads; install it "
        "(pip install -e '.[tf]') so it can be converted to ArrayRecord, or rebuild the dataset "
        "with file_format='array_record'") from None
  from tensorflow_datasets.scripts.cli import convert_format_utils
  print(f"{builder.data_dir}: converting {file_format} to array_record (once, in place)")
  convert_format_utils.convert_dataset(out_dir=None, out_file_format="array_record",
                                       dataset_version_dir=str(builder.data_dir), num_workers=1)
  builder = tfds.builder_from_directory(str(builder.data_dir))
  return builder.as_data_source(split=split, decoders=decoders or None)


def source_features(source) -> dict[str, Any]:
  """{feature key: TFDS feature or None} of a source, from its dataset info or its first record."""
  info = getattr(source, "dataset_info", None)
  if info is not None:
    return dict(info.features.items())
  if len(source) == 0:
    return {}
  return {key: None for key in source[0]}


def source_metadata(source) -> dict[str, Any]:
  """The dataset's TFDS metadata (the embedding cache's settings), or {}."""
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
  if isinstance(value, (bytes, np.bytes_)):
    try:
      image = Image.open(io.BytesIO(value))
      image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
      raise ValueError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None
    return image
  array = np.asarray(value)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise ValueError(f"{where}: expected encoded bytes or a uint8 image array, got "
                     f"{array.dtype} {array.shape}")
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


def crop_offsets(width: int, height: int, resolution: int,
                 rng: np.random.Generator | None) -> tuple[int, int]:
  """(top, left) of the crop in the resized image: centred as torchvision rounds, or random."""
  resized_w, resized_h = shortest_side_size(width, height, resolution)
  if rng is None:
    return (int(round((resized_h - resolution) / 2.0)),
            int(round((resized_w - resolution) / 2.0)))
  return (int(rng.integers(0, resized_h - resolution + 1)),
          int(rng.integers(0, resized_w - resolution + 1)))


def crop_pixels(image: Image.Image, resolution: int, top: int, left: int) -> np.ndarray:
  """vae_pixels with the crop at (top, left) of the resized image instead of the centre."""
  image = to_rgb(image)
  image = image.resize(shortest_side_size(image.width, image.height, resolution),
                       resample=Image.Resampling.BILINEAR)
  array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.float32)
  return (array / 255.0 - 0.5) / 0.5


@dataclasses.dataclass(frozen=True)
class RawExample:
  """(stream index, image-text record) -> the raw batch entries of one example."""
  spec: DataSpec
  seed: int

  def __call__(self, index: int, record: dict[str, Any]) -> dict[str, np.ndarray]:
    spec, R = self.spec, self.spec.resolution
    image = decode_image(lookup(record, spec.image_key, index), f"example {index}")
    caption = decode_text(lookup(record, spec.caption_key, index), f"example {index}")
    width, height = image.size
    # A generator per (seed, stream position): a restored iterator crops exactly the same.
    rng = np.random.default_rng([self.seed, index]) if spec.random_crop else None
    top, left = crop_offsets(width, height, R, rng)
    pixels = crop_pixels(image, R, top, left) if rng is not None else vae_pixels(image, R)
    out = {"pixels": pixels,
           "time_ids": np.asarray([height, width, top, left, R, R], np.float32)}
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


def example_transform(source, spec: DataSpec, seed: int):
  """The per-example transform for a source: RawExample, or CachedExample for a cache."""
  features = source_features(source)
  if "latent_mean" in features:
    if spec.random_crop:
      raise ValueError("an embedding cache holds one centre crop per image; use "
                       "random_crop=False with it")
    cached_resolution = source_metadata(source).get("resolution")
    if cached_resolution is not None and cached_resolution != spec.resolution:
      raise ValueError(f"the embedding cache was made at resolution {cached_resolution}, "
                       f"the spec asks for {spec.resolution}")
    return CachedExample(tuple(k for k in CACHED_KEYS if k in features))
  for key in (spec.image_key, spec.caption_key):
    if features and key.split("/")[0] not in features:
      raise KeyError(f"the source has no feature '{key}' (it has {sorted(features)}); set "
                     "DataSpec.image_key / caption_key")
  return RawExample(spec, seed)


# ---------------------------------------------------------------------------------------------
# Global batches


class TrainIterator:
  """Global batches ({key: jax.Array} sharded over the batch axes), resumable exactly.

  When process_index/process_count are simulated (differ from JAX's), each array holds only
  this process's share of the global batch.
  """

  def __init__(self, batches: grain.MapDataset, *, sharding: NamedSharding,
               global_batch_size: int, worker_count: int, num_threads: int,
               config: dict[str, Any], real_processes: bool):
    self._batches = batches
    self._sharding = sharding
    self._global_batch_size = global_batch_size
    self._worker_count = worker_count
    self._num_threads = num_threads
    self._config = config
    self._real_processes = real_processes
    self._step = 0
    self._iterator = None

  def __iter__(self):
    return self

  def _open(self):
    """A grain iterator over the batches from the current step on."""
    ds = self._batches[self._step:].to_iter_dataset(grain.ReadOptions(
        num_threads=self._num_threads, prefetch_buffer_size=self._num_threads))
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

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable state; set_state(state) continues with exactly the next batch."""
    return {"format": STATE_FORMAT, "step": self._step, "config": dict(self._config)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a get_state() of an iterator over the same data with the same settings."""
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"not a TrainIterator state (format {state.get('format')!r}, expected "
                       f"{STATE_FORMAT!r})")
    changed = {k: (v, self._config.get(k)) for k, v in state["config"].items()
               if self._config.get(k) != v}
    if changed:
      detail = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
      raise ValueError(f"iterator state does not fit this data pipeline ({detail})")
    self.close()
    self._step = int(state["step"])

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
    raise ValueError(f"none of the batch axes {tuple(batch_axes)} is a mesh axis "
                     f"{tuple(mesh.axis_names)}")
  return axes


def make_train_iterator(source, spec: DataSpec, *, global_batch_size: int,
                        mesh: jax.sharding.Mesh, seed: int,
                        batch_axes: Sequence[str] = ("data", "fsdp"),
                        num_epochs: int | None = None, worker_count: int = 0,
                        process_index: int | None = None, process_count: int | None = None,
                        num_threads: int | None = None) -> TrainIterator:
  """Shuffled (seed), per-process sharded global batches of a source from `open_source`.

  Raw sources give pixels, time_ids, input_ids (and input_ids_2, clip_pixels); an embedding
  cache gives its stored arrays. `num_epochs=None` repeats forever; with a number, the stream
  ends after the last whole global batch. `worker_count` > 0 preprocesses in that many
  processes (same batches).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if not 0 <= seed < 2 ** 32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  axes = mesh_batch_axes(mesh, batch_axes)
  shards = math.prod(mesh.shape[a] for a in axes)
  if global_batch_size % process_count or global_batch_size % shards:
    raise ValueError(f"global_batch_size {global_batch_size} must divide evenly over "
                     f"{process_count} processes and the {shards} devices of the batch axes "
                     f"{axes}")
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError("the source has no examples")
  local_batch = global_batch_size // process_count

  transform = example_transform(source, spec, seed)
  stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
  stream = stream.map_with_index(transform)  # index = position in the global stream
  if num_epochs is not None:  # every process gets the same number of whole batches
    stream = stream[:len(stream) // global_batch_size * global_batch_size]
  # Global batch b is chunks b*P .. b*P+P-1 of the stream cut into local-size chunks, and
  # process i takes chunk b*P+i: the global batches (and the iterator state) are the same
  # whatever the number of processes, so a run resumes on any number of hosts.
  batches = stream.batch(local_batch, drop_remainder=True)[process_index::process_count]
  config = dict(num_examples=num_examples, seed=seed, global_batch_size=global_batch_size,
                num_epochs=num_epochs)
  return TrainIterator(
      batches, sharding=NamedSharding(mesh, PartitionSpec(axes)),
      global_batch_size=global_batch_size,
      worker_count=worker_count, num_threads=num_threads or min(8, os.cpu_count() or 1),
      config=config, real_processes=process_count == jax.process_count())
