"""The training batches of any data source: the arguments checked once, then the grain pipeline
of a random-access source (input_pipeline.py) or the stream of webdataset shards (streaming.py)."""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ipadapter_jax.data import input_pipeline, streaming
from ipadapter_jax.data.input_pipeline import DataSpec, TrainIterator, mesh_batch_axes
from ipadapter_jax.data.tar_shards import WebDatasetSource


def make_train_iterator(
  source,
  spec: DataSpec,
  *,
  global_batch_size: int,
  mesh: jax.sharding.Mesh,
  seed: int,
  batch_axes: Sequence[str] = ("data", "fsdp"),
  num_epochs: int | None = None,
  worker_count: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  num_threads: int | None = None,
  max_bad_records: int = 0,
  shuffle_buffer: int = 1000,
) -> TrainIterator:
  """Shuffled (seed), per-process sharded global batches of a source from `open_source`.

  Raw sources give pixels, time_ids, input_ids (and input_ids_2, clip_pixels); an embedding
  cache gives its stored arrays. `num_epochs=None` repeats forever; with a number, the stream
  ends after the last whole global batch. `worker_count` > 0 preprocesses in that many
  processes (same batches). Up to `max_bad_records` undecodable records are skipped (replaced by
  the next record of the stream); one more stops the iteration with a ValueError naming it.
  Webdataset shards are streamed instead (streaming.py: each process reads its own shards
  through a `shuffle_buffer`-record shuffle buffer).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  if max_bad_records < 0:
    raise ValueError(f"max_bad_records must be 0 or more, got {max_bad_records}")
  axes = mesh_batch_axes(mesh, batch_axes)
  shards = math.prod(mesh.shape[a] for a in axes)
  if global_batch_size % process_count or global_batch_size % shards:
    raise ValueError(
      f"global_batch_size {global_batch_size} must divide evenly over "
      f"{process_count} processes and the {shards} devices of the batch axes "
      f"{axes}"
    )
  # Reading from an object store is latency bound: more requests in flight.
  remote = getattr(source, "remote", False)
  num_threads = num_threads or (32 if remote else min(8, os.cpu_count() or 1))
  sharding = NamedSharding(mesh, PartitionSpec(axes))
  settings = dict(
    global_batch_size=global_batch_size,
    sharding=sharding,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    num_epochs=num_epochs,
    worker_count=worker_count,
    num_threads=num_threads,
    max_bad_records=max_bad_records,
  )
  if isinstance(source, WebDatasetSource):
    return streaming.make_stream_iterator(source, spec, shuffle_buffer=shuffle_buffer, **settings)
  return input_pipeline.grain_iterator(source, spec, **settings)
