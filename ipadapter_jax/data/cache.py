"""The frozen encoders run once over a dataset -> an embedding cache (cache_files.py's folder).

Training on the cache skips the VAE encoder, the CLIP image encoder and the text encoder(s): each
example holds the VAE posterior's moments (so a new latent is drawn every step with
`ipadapter_jax.models.vae.sample_posterior`), the image features, the text states and the
SDXL time ids, NHWC for latents, in float32 or bfloat16. `open_source(folder)` and
`make_train_iterator` read it like any other source. The encodings of the empty caption, which
condition dropout substitutes, are stored once in `empty_text.npz`.

Every host builds its own parts in parallel: the source is cut into parts (`examples_per_part`
records of a random-access source, or one webdataset shard each), host i of n encodes parts
i, i + n, ..., each on all its local devices, and writes them itself; the last host to finish
writes the index. A build run again skips the parts already written. Records that do not decode
are skipped and listed in their part's json.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from ipadapter_jax import storage
from ipadapter_jax.data import cache_files, tar_shards
from ipadapter_jax.data.image_text import resolve_dataset_dir
from ipadapter_jax.data.input_pipeline import DataSpec, RawExample, is_cached, ordered_map
from ipadapter_jax.generation.conditioning import CACHE_KEYS, encode_image, encode_text
from ipadapter_jax.models.networks import Networks
from ipadapter_jax.preprocessing import CLIPImageConfig
from ipadapter_jax.tokenizer import tokenize
from ipadapter_jax.weights.stable_diffusion import StableDiffusion

EMPTY_TEXT_FILE = cache_files.EMPTY_TEXT_FILE


@dataclasses.dataclass(frozen=True)
class CacheReport:
  """Where the cache went, what each example holds and what this host did."""

  dataset_dir: str
  num_examples: int  # in the whole cache when complete, else in this host's parts
  shapes: dict[str, tuple[int, ...]]  # per example
  settings: dict[str, Any]
  complete: bool = True  # False: other hosts' parts are still missing
  parts_written: int = 0  # by this call (parts already there are skipped)
  skipped: tuple[tuple[str, str], ...] = ()  # (record, why) of this call's undecodable records


def _encode(graphdef, state, batch: dict[str, jax.Array], *, image_features: str):
  """One batch of preprocessed examples -> the cached arrays (float32)."""
  models = nnx.merge(graphdef, state)
  mean, logvar = models.vae.encode(batch["pixels"])
  context, pooled = encode_text(
    models.text_encoder, models.text_encoder_2, batch["input_ids"], batch.get("input_ids_2")
  )
  out = {
    "latent_mean": mean,
    "latent_logvar": logvar,
    "text_context": context,
    CACHE_KEYS[image_features]: encode_image(
      models.image_encoder, batch["clip_pixels"], image_features
    ),
  }
  if pooled is not None:
    out["text_pooled"] = pooled
  return {key: value.astype(jnp.float32) for key, value in out.items()}


def _encode_empty_text(graphdef, state, ids, ids_2):
  """The "" caption's text states, as condition dropout uses them."""
  models = nnx.merge(graphdef, state)
  context, pooled = encode_text(models.text_encoder, models.text_encoder_2, ids, ids_2)
  out = {"text_context": context[0]}
  if pooled is not None:
    out["text_pooled"] = pooled[0]
  return {key: value.astype(jnp.float32) for key, value in out.items()}


_encode_jit = jax.jit(_encode, static_argnames=("graphdef", "image_features"))
_encode_empty_text_jit = jax.jit(_encode_empty_text, static_argnames=("graphdef",))


def cache_spec(spec: DataSpec, models: StableDiffusion) -> DataSpec:
  """The spec the cache pass preprocesses with: centre crops, and the models' CLIP settings and
  tokenizers wherever the spec leaves them out."""
  if spec.random_crop:
    raise ValueError("the cache stores one crop per image; use random_crop=False")
  tokenizer_2 = spec.tokenizer_2 if spec.tokenizer_2 is not None else models.tokenizer_2
  return dataclasses.replace(
    spec,
    clip=spec.clip or models.image_processor or CLIPImageConfig(),
    tokenizer=spec.tokenizer if spec.tokenizer is not None else models.tokenizer,
    tokenizer_2=tokenizer_2 if models.is_sdxl else None,
  )


def _pad(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads a short last batch with copies of its first row (one compiled shape)."""
  n = len(next(iter(batch.values())))
  if n == size:
    return batch
  return {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) for k, v in batch.items()}


def cache_parts(source, examples_per_part: int) -> list[Any]:
  """The parts a source is cut into, in order: (start, stop) record ranges of a random-access
  source, or shard paths of webdataset shards."""
  if isinstance(source, tar_shards.WebDatasetSource):
    return list(source.shards)
  if examples_per_part < 1:
    raise ValueError(f"examples_per_part must be 1 or more, got {examples_per_part}")
  n = len(source)
  return [(start, min(start + examples_per_part, n)) for start in range(0, n, examples_per_part)]


def _part_records(source, part) -> Iterator[tuple[int, str, Callable[[], Any]]]:
  """(index, where, a function giving the record) for the records of one part: a shard is
  read here in order, a random-access record by whichever thread preprocesses it."""
  if isinstance(part, str):
    for number, (offset, record, _) in enumerate(tar_shards.read_records(part)):
      yield number, f"{tar_shards.base_name(part)} byte {offset}", lambda r=record: r
  else:
    for index in range(*part):
      yield index, f"record {index}", functools.partial(source.__getitem__, index)


def _record_id(record, fallback: str) -> str:
  value = record.get("id") if isinstance(record, dict) else None
  if isinstance(value, bytes):
    value = value.decode("utf-8", "replace")
  return f"{fallback}, id {value}" if value is not None else fallback


class _Encoder:
  """The frozen encoders, compiled for one batch shape and laid over this host's devices."""

  def __init__(self, models: StableDiffusion, image_features: str, batch_size: int):
    graphdef, state = nnx.split(
      Networks(
        vae=models.vae,
        text_encoder=models.text_encoder,
        text_encoder_2=models.text_encoder_2,
        image_encoder=models.image_encoder,
      )
    )
    devices = jax.local_devices()
    if batch_size % len(devices):
      devices = devices[:1]  # a batch that does not split evenly runs on one device
    mesh = Mesh(np.asarray(devices), ("data",))
    self._rows = NamedSharding(mesh, PartitionSpec("data"))
    self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    self._graphdef, self._image_features, self.batch_size = graphdef, image_features, batch_size

  def __call__(self, examples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    padded = {
      k: jax.device_put(v, self._rows)
      for k, v in _pad(batch, self.batch_size).items()
      if k != "time_ids"
    }
    out = _encode_jit(self._graphdef, self._state, padded, image_features=self._image_features)
    out = {k: np.asarray(v)[: len(examples)] for k, v in out.items()}
    out["time_ids"] = batch["time_ids"]
    return [{k: v[j] for k, v in out.items()} for j in range(len(examples))]

  def empty_text(self, spec: DataSpec) -> dict[str, np.ndarray]:
    ids_2 = tokenize(spec.tokenizer_2, "") if spec.tokenizer_2 is not None else None
    empty = _encode_empty_text_jit(self._graphdef, self._state, tokenize(spec.tokenizer, ""), ids_2)
    return {key: np.asarray(value) for key, value in empty.items()}


def build_embedding_cache(
  source,
  spec: DataSpec,
  models: StableDiffusion,
  out_dir: str,
  *,
  image_features: str = "image_embeds",
  batch_size: int = 16,
  dtype: str = "float32",
  name: str = "embedding_cache",
  process_index: int | None = None,
  process_count: int | None = None,
  examples_per_part: int = 4096,
  num_threads: int | None = None,
) -> CacheReport:
  """Runs the frozen encoders over this host's parts of a raw source (`open_source`) and writes
  them to `out_dir` (a local folder or a gs:// URI); see the module docstring.

  image_features: "image_embeds" (basic adapters) or "hidden_states" (the image encoder's
  penultimate hidden states, for Plus and Full-face). dtype: "float32" or "bfloat16" (the
  stored arrays). process_index / process_count: this host's place among the hosts building
  the cache together (JAX's process index and count by default).
  """
  if image_features not in CACHE_KEYS:
    raise ValueError(f"image_features must be one of {sorted(CACHE_KEYS)}, got {image_features!r}")
  if dtype not in cache_files.DTYPES:
    raise ValueError(f"dtype must be one of {sorted(cache_files.DTYPES)}, got {dtype!r}")
  if models.vae is None:
    raise ValueError(
      "the cache stores VAE latents; a pixel-space model (no vae) trains on the "
      "raw image-text dataset instead"
    )
  if models.image_encoder is None:
    raise ValueError(
      "the cache needs a CLIP image encoder (load_stable_diffusion(..., image_encoder=...))"
    )
  if is_cached(source):
    raise ValueError("the source is already an embedding cache")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  out_dir = storage.resolve(out_dir, "--out")
  if storage.is_remote(out_dir):
    storage.check_reachable(out_dir)
  if cache_files.is_cache_folder(out_dir):
    raise FileExistsError(
      f"{out_dir}: already holds a complete embedding cache; remove it or choose another folder"
    )
  spec = cache_spec(spec, models)
  settings = dict(
    resolution=spec.resolution,
    image_features=image_features,
    sdxl=models.is_sdxl,
    latent_channels=models.vae.config.latent_channels,
    scaling_factor=models.vae.config.scaling_factor,
    clip_size=list(spec.clip.crop_size),
    dtype=dtype,
  )
  encoder = _Encoder(models, image_features, batch_size)
  if process_index == 0:
    cache_files.write_empty_text(out_dir, encoder.empty_text(spec))

  parts = cache_parts(source, examples_per_part)
  mine = list(range(process_index, len(parts), process_count))
  transform = RawExample(spec, seed=0)
  threads = num_threads or min(8, os.cpu_count() or 1)
  written, skipped, count, layout = 0, [], 0, None
  with (
    concurrent.futures.ThreadPoolExecutor(threads) as pool,
    tqdm(total=len(mine), desc=f"{name}: parts of host {process_index}", unit="part") as bar,
  ):
    for part in mine:
      done = cache_files.part_done(out_dir, part)
      if done is not None and done.get("settings", settings) != settings:
        raise ValueError(
          f"{out_dir}: {cache_files.part_name(part)} was made with other "
          f"settings ({done['settings']}, now {settings}); remove the folder or "
          "choose another"
        )
      if done is None:
        done, layout = _write_part(
          source,
          parts[part],
          part,
          out_dir,
          encoder,
          transform,
          pool,
          dtype,
          layout,
          skipped,
          settings,
        )
        written += 1
      count += done["num_examples"]
      layout = layout or (
        cache_files.RowLayout.from_json(done["layout"]) if done.get("layout") else None
      )
      bar.update(1)
  complete = cache_files.write_index_when_complete(out_dir, len(parts), settings, name)
  if complete:
    index = cache_files.CacheSource(out_dir)
    count, layout = len(index), index.layout
  shapes = {k: shape for k, (shape, _) in layout.fields.items()} if layout else {}
  return CacheReport(
    dataset_dir=out_dir,
    num_examples=count,
    shapes=shapes,
    settings=settings,
    complete=complete,
    parts_written=written,
    skipped=tuple(skipped),
  )


def _write_part(
  source,
  part,
  number: int,
  out_dir: str,
  encoder: _Encoder,
  transform: RawExample,
  pool,
  dtype: str,
  layout,
  skipped: list,
  settings: dict[str, Any],
):
  """Encodes and writes one part; returns (its json, the row layout)."""

  def preprocess(item):
    index, _, read = item
    record = read()
    try:
      return record, transform(index, record), None
    except ValueError as e:
      return record, None, str(e).removeprefix(f"example {index}: ")

  writer, pending, part_skipped = None, [], []

  def flush():
    nonlocal writer, layout
    for example in encoder(pending):
      if writer is None:
        layout = layout or cache_files.RowLayout.for_shapes(
          {k: v.shape for k, v in example.items()}, dtype
        )
        writer = cache_files.PartWriter(out_dir, number, layout)
      writer.write(example)
    pending.clear()

  results = ordered_map(
    lambda item: pool.submit(preprocess, item),
    _part_records(source, part),
    window=4 * encoder.batch_size,
  )
  try:
    for (_, where, _), (record, example, problem) in results:
      if problem is not None:
        part_skipped.append([_record_id(record, where), problem])
        continue
      pending.append(example)
      if len(pending) == encoder.batch_size:
        flush()
    if pending:
      flush()
  except BaseException:
    if writer is not None:
      writer.abandon()
    raise
  skipped.extend(tuple(s) for s in part_skipped)
  extra = {"settings": settings, "skipped": part_skipped}
  if writer is None:  # nothing in the part decoded: a part without rows
    return cache_files.write_empty_part(out_dir, number, extra), layout
  writer.finish(extra)
  return cache_files.part_done(out_dir, number), layout


def load_empty_text(out_dir: str) -> dict[str, np.ndarray]:
  """The empty caption's cached states: text_context [T, D] (and text_pooled [P] for SDXL)."""
  if cache_files.is_cache_folder(out_dir):
    return cache_files.read_empty_text(out_dir)
  path = os.path.join(resolve_dataset_dir(out_dir), EMPTY_TEXT_FILE)  # a TFDS-built cache
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing; is this an embedding cache folder?")
  with np.load(path) as data:
    return {key: data[key] for key in data.files}
