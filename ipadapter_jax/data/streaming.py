"""Webdataset shards -> per-process shuffled batches, resumable exactly.

Each process reads only its own shards: in epoch e, the shards in the order of a permutation
drawn from (seed, e), process i of n taking every n-th from the i-th. Their records pass through
a shuffle buffer of `shuffle_buffer` records, whose draws are a pure function of
(seed, epoch, process, draw number); at the end of an epoch the buffer is drained, so every
record of the epoch is seen once. Preprocessing (decode, crops, CLIP pixels, tokens) runs in
threads (or `worker_count` processes) in stream order, so the batches do not depend on them.

The position after a batch is (epoch, shard, byte offset of the next record, draws so far, the
(shard, offset) address of every buffered record, records handed out): restoring it reopens the
shard at that offset and reads the buffered records back from their addresses, so a resumed run
continues with exactly the next batch without reading what came before. The checkpointed state
holds the position of every process (gathered when the state is taken); a run resumes on the
same number of processes. Undecodable records are skipped (the stream goes on with the next
one), counted in the state, and more than `max_bad_records` stop the run naming the record.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import queue
import threading
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from ipadapter_jax.data import tar_shards
from ipadapter_jax.data.input_pipeline import DataSpec, RawExample, TrainIterator, ordered_map

STATE_FORMAT = "ipadapter_jax.StreamIterator/1"
_MASK = (1 << 64) - 1


def _mix(value: int) -> int:
  """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
  value = (value + 0x9E3779B97F4A7C15) & _MASK
  value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
  value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
  return value ^ (value >> 31)


def draw(seed: int, epoch: int, process: int, number: int, size: int) -> int:
  """The buffer slot (in [0, size)) of draw `number`: a pure function, so no generator state
  needs saving."""
  value = 0
  for part in (seed, epoch, process, number):
    value = _mix(value ^ (part & _MASK))
  return value % size


def shard_order(
  num_shards: int, seed: int, epoch: int, process_index: int, process_count: int
) -> list[int]:
  """The shards process `process_index` reads in `epoch`, in order (disjoint across
  processes, all of them read once per epoch)."""
  permutation = np.random.default_rng([seed, epoch]).permutation(num_shards)
  return [int(s) for s in permutation[process_index::process_count]]


@dataclasses.dataclass
class StreamPosition:
  """Where a process's stream stands (see the module docstring)."""

  epoch: int = 0
  shard: int = 0  # index into the process's shard order of the epoch
  offset: int = 0  # byte offset, in that shard, of the next record to read
  drawn: int = 0  # records drawn from the buffer in this epoch
  buffer: list = dataclasses.field(default_factory=list)  # [shard, offset] of each slot
  position: int = 0  # records handed out by this process since the start
  skipped: int = 0  # of those, undecodable (skipped)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, state: dict[str, Any]) -> "StreamPosition":
    return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})


class ShuffledStream:
  """The records of one process's shards, shuffled through a buffer, from any position."""

  def __init__(
    self,
    source: tar_shards.WebDatasetSource,
    *,
    seed: int,
    process_index: int,
    process_count: int,
    buffer_size: int,
    num_epochs: int | None,
  ):
    self.source = source
    self.seed, self.process_index, self.process_count = seed, process_index, process_count
    self.buffer_size, self.num_epochs = buffer_size, num_epochs

  def _refill(self, buffer: list) -> list:
    """The buffered records, read back from their addresses (in parallel: each may be a
    request to an object store)."""

    def one(address):
      return tuple(address), tar_shards.record_at(self.source.shards[address[0]], address[1])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      return list(pool.map(one, buffer))

  def records(self, start: StreamPosition) -> Iterator[tuple[int, dict, str, StreamPosition]]:
    """(stream index, record, where it is, position after it) from `start` on. The stream
    index is unique over processes (what random crops are seeded with)."""
    at = dataclasses.replace(start, buffer=[])
    slots = self._refill(start.buffer)  # (address, record) pairs
    addresses = [address for address, _ in slots]  # kept beside: copied at every record
    shards = self.source.shards

    def hand_out(slot):
      address, record = slot
      index = at.position * self.process_count + self.process_index
      at.position += 1
      at.drawn += 1
      where = f"{tar_shards.base_name(shards[address[0]])} byte {address[1]}"
      return index, record, where, dataclasses.replace(at, buffer=addresses.copy())

    while self.num_epochs is None or at.epoch < self.num_epochs:
      order = shard_order(len(shards), self.seed, at.epoch, self.process_index, self.process_count)
      while at.shard < len(order):
        current, shard = at.shard, order[at.shard]
        for offset, record, next_offset in tar_shards.read_records(shards[shard], at.offset):
          at.shard, at.offset = (
            (current, next_offset) if next_offset is not None else (current + 1, 0)
          )
          if len(slots) < self.buffer_size:
            slots.append(((shard, offset), record))
            addresses.append((shard, offset))
            continue
          slot = draw(self.seed, at.epoch, self.process_index, at.drawn, len(slots))
          out, slots[slot] = slots[slot], ((shard, offset), record)
          addresses[slot] = (shard, offset)
          yield hand_out(out)
        if at.shard == current:  # read to its end
          at.shard, at.offset = current + 1, 0
      while slots:  # the epoch's end: the buffer drains in random order
        slot = draw(self.seed, at.epoch, self.process_index, at.drawn, len(slots))
        out, slots[slot], addresses[slot] = slots[slot], slots[-1], addresses[-1]
        slots.pop()
        addresses.pop()
        yield hand_out(out)
      if at.drawn == 0:
        raise ValueError(
          f"process {self.process_index}'s shards of epoch {at.epoch} hold no "
          f"records ({len(order)} of the {len(shards)} in {self.source.source})"
        )
      at.epoch, at.shard, at.offset, at.drawn = at.epoch + 1, 0, 0, 0


# ---------------------------------------------------------------------------------------------
# Preprocessing in threads or processes, in stream order

_TRANSFORM = None  # a worker process's transform (set once, not sent with every record)


def _set_transform(transform) -> None:
  global _TRANSFORM  # pylint: disable=global-statement
  _TRANSFORM = transform


def _preprocess(transform, index: int, record: dict) -> tuple[dict | None, str | None]:
  """(example, None), or (None, why the record does not decode)."""
  try:
    return transform(index, record), None
  except ValueError as e:
    return None, str(e).removeprefix(f"example {index}: ")


def _preprocess_in_worker(index: int, record: dict):
  return _preprocess(_TRANSFORM, index, record)


class _End:
  """The stream ended (a finite number of epochs)."""


@dataclasses.dataclass
class _Failure:
  error: BaseException


class _Producer:
  """A thread that reads the stream, preprocesses it in a pool and queues whole local batches
  with the position after each and the records it skipped."""

  def __init__(
    self,
    stream: ShuffledStream,
    start: StreamPosition,
    transform: RawExample,
    local_batch: int,
    num_threads: int,
    worker_count: int,
    prefetch: int = 2,
  ):
    self._stream, self._start, self._transform = stream, start, transform
    self._local_batch, self._num_threads, self._worker_count = (
      local_batch,
      num_threads,
      worker_count,
    )
    self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True, name="stream-producer")
    self._thread.start()

  def _pool(self):
    if self._worker_count > 0:
      return concurrent.futures.ProcessPoolExecutor(
        self._worker_count,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_set_transform,
        initargs=(self._transform,),
      )
    return concurrent.futures.ThreadPoolExecutor(self._num_threads)

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      with self._pool() as pool:
        if self._worker_count:
          submit = lambda item: pool.submit(_preprocess_in_worker, item[0], item[1])
        else:
          submit = lambda item: pool.submit(_preprocess, self._transform, item[0], item[1])
        window = 4 * max(self._num_threads, self._worker_count, 1)
        batch, skipped = [], []
        for (index, record, where, position), (example, problem) in ordered_map(
          submit, self._stream.records(self._start), window
        ):
          if self._stop.is_set():
            return
          if problem is None:
            batch.append(example)
          else:
            skipped.append(f"stream position {index}, {where}, id {_id(record)!r}: {problem}")
          if len(batch) == self._local_batch:
            stacked = {k: np.stack([e[k] for e in batch]) for k in batch[0]}
            if not self._put((stacked, position, skipped)):
              return
            batch, skipped = [], []
        self._put(_End())
    except BaseException as e:  # pylint: disable=broad-except
      self._put(_Failure(e))

  def get(self):
    item = self._queue.get()
    if isinstance(item, _Failure):
      raise item.error
    return item

  def close(self):
    self._stop.set()
    self._thread.join(timeout=30)


def _id(record) -> str:
  value = record.get("id") if isinstance(record, dict) else None
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# The iterator


class StreamIterator(TrainIterator):
  """TrainIterator over webdataset shards: the same batches interface, a stream's state."""

  def __init__(
    self,
    stream: ShuffledStream,
    transform: RawExample,
    *,
    local_batch: int,
    sharding: NamedSharding,
    global_batch_size: int,
    worker_count: int,
    num_threads: int,
    config: dict[str, Any],
    real_processes: bool,
    max_bad_records: int,
  ):
    super().__init__(
      None,
      sharding=sharding,
      global_batch_size=global_batch_size,
      worker_count=worker_count,
      num_threads=num_threads,
      config=config,
      real_processes=real_processes,
      max_bad_records=max_bad_records,
    )
    self._stream, self._transform, self._local_batch = stream, transform, local_batch
    self._position = StreamPosition()
    self._producer = None

  def _next_batch(self) -> dict[str, np.ndarray]:
    if self._producer is None:
      self._producer = _Producer(
        self._stream,
        self._position,
        self._transform,
        self._local_batch,
        self._num_threads,
        self._worker_count,
      )
    item = self._producer.get()
    if isinstance(item, _End):
      raise StopIteration
    batch, position, skipped = item
    self._position = position
    self._step += 1
    for problem in skipped:
      self._skipped += 1
      if self._skipped > self._max_bad_records:
        raise ValueError(
          f"{self._skipped} records skipped as undecodable, more than "
          f"max_bad_records={self._max_bad_records}; the last: {problem}"
        )
    return batch

  @property
  def position(self) -> StreamPosition:
    """This process's stream position after the batches handed out."""
    return self._position

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable state holding every process's position (gathered from all of them
    in a multi-process run: every process must call it at the same step)."""
    mine = dict(self._position.to_json(), skipped=self._skipped)
    process = self._stream.process_index
    if self._real_processes and jax.process_count() > 1:
      positions = dict(enumerate(_allgather_json(mine)))
    else:
      positions = {process: mine}
    return {
      "format": STATE_FORMAT,
      "step": self._step,
      "skipped_records": self._skipped,
      "config": dict(self._config),
      "positions": {str(p): value for p, value in positions.items()},
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("format") != STATE_FORMAT:
      raise ValueError(
        f"the saved data position is not one of a webdataset stream (format "
        f"{state.get('format')!r}, expected {STATE_FORMAT!r}): resume with the "
        "data source the run was trained on"
      )
    changed = {
      k: (v, self._config.get(k)) for k, v in state["config"].items() if self._config.get(k) != v
    }
    if changed:
      detail = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
      raise ValueError(f"iterator state does not fit this data pipeline ({detail})")
    process = str(self._stream.process_index)
    if process not in state["positions"]:
      raise ValueError(
        f"the saved data state holds no position for process {process} (it "
        f"holds {sorted(state['positions'], key=int)})"
      )
    self.close()
    self._step = int(state["step"])
    self._position = StreamPosition.from_json(state["positions"][process])
    self._skipped = int(self._position.skipped)

  def close(self) -> None:
    if self._producer is not None:
      self._producer.close()
    self._producer = None


def _allgather_json(value) -> list:
  """Every process's JSON-serialisable `value`, in process order (a collective)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([len(data)], np.int64))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [
    json.loads(bytes(row[: int(n)]).decode())
    for row, n in zip(gathered, np.asarray(lengths).reshape(-1))
  ]


def make_stream_iterator(
  source: tar_shards.WebDatasetSource,
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
  shuffle_buffer: int,
) -> StreamIterator:
  """The iterator make_train_iterator returns for webdataset shards (its checks done)."""
  if shuffle_buffer < 1:
    raise ValueError(f"shuffle_buffer must be 1 or more, got {shuffle_buffer}")
  if len(source.shards) < process_count:
    raise ValueError(
      f"{source.source}: {len(source.shards)} shards for {process_count} "
      "processes; each process reads its own shards, so give at least one per "
      "process (more, for an even share)"
    )
  for key in (spec.image_key, spec.caption_key):
    if key.split("/")[0] not in source.features:
      raise KeyError(
        f"the shards' records have no '{key}' (they have "
        f"{sorted(source.features)}); set DataSpec.image_key / caption_key"
      )
  stream = ShuffledStream(
    source,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    buffer_size=shuffle_buffer,
    num_epochs=num_epochs,
  )
  config = dict(
    source="webdataset",
    shards=len(source.shards),
    shard_names=source.fingerprint(),
    seed=seed,
    global_batch_size=global_batch_size,
    num_epochs=num_epochs,
    process_count=process_count,
    shuffle_buffer=shuffle_buffer,
  )
  return StreamIterator(
    stream,
    RawExample(spec, seed),
    local_batch=global_batch_size // process_count,
    sharding=sharding,
    global_batch_size=global_batch_size,
    worker_count=worker_count,
    num_threads=num_threads,
    config=config,
    real_processes=process_count == jax.process_count(),
    max_bad_records=max_bad_records,
  )
