"""Training data read in place: imagefolder (metadata.jsonl / metadata.csv) and webdataset tar
shards, local and on gs://, with exact resume; how data.source names a format."""

import io
import json
import os
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.data import streaming, tar_shards
from ipadapter_jax.data.batches import make_train_iterator
from ipadapter_jax.data.image_text import build_image_text_dataset
from ipadapter_jax.data.input_pipeline import (
  DataSpec,
  open_source,
  source_format,
)
from ipadapter_jax.tokenizer import load_tokenizer, tokenize, write_word_tokenizer
from tests import torch_reference as ref
from tests.test_storage import fake_gcs  # noqa: F401  (a fixture)

R = 16
WORDS = ["a", "red", "green", "blue", "circle", "square", "photo", "of"]
NUM_SHARDS, PER_SHARD = 3, 8


def _mesh():
  return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _jpeg(rng, height: int, width: int) -> bytes:
  blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  image = Image.fromarray(blocks).resize((width, height), Image.Resampling.NEAREST)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def _examples(count: int, seed: int = 0, first: int = 0):
  """(key, jpeg bytes, caption, (height, width)): every size differs, so it names the example."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(first, first + count):
    size = (17 + i, 40 - i // 2)
    caption = " ".join(rng.choice(WORDS, size=3))
    out.append((f"{i:06d}", _jpeg(rng, *size), caption, size))
  return out


def _sizes(batch) -> list[tuple[int, int]]:
  return [(int(h), int(w)) for h, w in np.asarray(batch["time_ids"])[:, :2]]


def _write_shard(path, records, mtime=1.0):
  """A tar shard as img2dataset writes it: KEY.jpg, KEY.txt, KEY.json per record."""
  with tarfile.open(path, "w") as tar:
    for key, members in records:
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime = len(data), mtime
        tar.addfile(info, io.BytesIO(data))


def _members(key, jpeg, caption):
  return {
    "jpg": jpeg,
    "txt": caption.encode(),
    "json": json.dumps({"key": key, "caption": caption.upper()}).encode(),
  }


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  folder = tmp_path_factory.mktemp("words")
  write_word_tokenizer(str(folder), ref.WORDS + WORDS, model_max_length=16)
  return load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """NUM_SHARDS shards of PER_SHARD records (mtime a float: each member gets a pax header, as
  webdataset's writer makes them): (folder, {size: caption})."""
  folder = tmp_path_factory.mktemp("shards")
  examples = _examples(NUM_SHARDS * PER_SHARD)
  for s in range(NUM_SHARDS):
    part = examples[s * PER_SHARD : (s + 1) * PER_SHARD]
    _write_shard(
      folder / f"{s:05d}.tar", [(k, _members(k, j, c)) for k, j, c, _ in part], mtime=1700000000.5
    )
  return folder, {size: caption for _, _, caption, size in examples}


def _stream(source, tokenizer, process_index=0, process_count=1, **kw):
  spec = DataSpec(
    resolution=R,
    random_crop=True,
    clip=None,
    tokenizer=tokenizer,
    caption_key=kw.pop("caption_key", "text"),
  )
  return make_train_iterator(
    source,
    spec,
    global_batch_size=2 * process_count,
    mesh=_mesh(),
    seed=kw.pop("seed", 5),
    process_index=process_index,
    process_count=process_count,
    shuffle_buffer=kw.pop("buffer", 5),
    **kw,
  )


# ---------------------------------------------------------------------------------------------
# Naming the source


def test_brace_patterns_expand_like_webdataset():
  assert tar_shards.expand_braces("s/{00008..00011}.tar") == [
    "s/00008.tar",
    "s/00009.tar",
    "s/00010.tar",
    "s/00011.tar",
  ]
  assert tar_shards.expand_braces("gs://b/{a,b}/{1..2}.tar") == [
    "gs://b/a/1.tar",
    "gs://b/a/2.tar",
    "gs://b/b/1.tar",
    "gs://b/b/2.tar",
  ]
  with pytest.raises(ValueError, match="neither a range"):
    tar_shards.expand_braces("s/{x}.tar")


def test_the_source_format_follows_from_what_data_source_names(shards, tmp_path):
  folder, _ = shards
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "metadata.csv").write_text("file_name,text\n")
  (tmp_path / "split" / "train").mkdir(parents=True)
  (tmp_path / "split" / "train" / "metadata.jsonl").write_text("")
  assert source_format(str(folder)) == "webdataset"
  assert source_format(f"{folder}/{{00000..00002}}.tar") == "webdataset"
  assert source_format(f"{folder}/*.tar") == "webdataset"
  assert source_format(str(tmp_path / "images")) == "imagefolder"
  assert source_format(str(tmp_path / "split")) == "imagefolder"
  (tmp_path / "built").mkdir()
  assert source_format("mnist") == source_format(str(tmp_path / "built")) == "tfds"
  with pytest.raises(ValueError, match="a pattern names webdataset shards, which end in .tar"):
    source_format(f"{folder}/*.zip")
  with pytest.raises(FileNotFoundError, match=r"00007.tar: no such shard"):
    open_source(f"{folder}/{{00000..00007}}.tar")
  with pytest.raises(ValueError, match="unsupported URL scheme 'http:'"):
    source_format("http://example.com/shards.tar")


# ---------------------------------------------------------------------------------------------
# Imagefolder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """The same images as an imagefolder (metadata.jsonl, a `caption` column too) and as the
  official JSON list for a built dataset: (folder, annotations, {size: caption})."""
  root = tmp_path_factory.mktemp("imagefolder")
  rows, entries = [], []
  examples = _examples(10, seed=1)
  for key, jpeg, caption, _ in examples:
    (root / "img").mkdir(exist_ok=True)
    (root / "img" / f"{key}.jpg").write_bytes(jpeg)
    rows.append({"file_name": f"img/{key}.jpg", "text": caption, "caption": caption.upper()})
    entries.append({"image_file": f"img/{key}.jpg", "text": caption})
  (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
  (root / "list.json").write_text(json.dumps(entries))
  return root, root / "list.json", {size: c for _, _, c, size in examples}


def test_imagefolder_gives_the_batches_of_the_same_images_built(image_folder, tokenizer, tmp_path):
  """Same images, same order: the same shuffle, crops and tokens as the ArrayRecord route."""
  root, annotations, captions = image_folder
  built = build_image_text_dataset(str(annotations), str(root), str(tmp_path / "built"))
  spec = DataSpec(resolution=R, random_crop=True, clip=None, tokenizer=tokenizer)
  make = lambda source: make_train_iterator(source, spec, global_batch_size=4, mesh=_mesh(), seed=2)
  folder, reference = make(open_source(str(root))), make(open_source(built.dataset_dir))
  for _ in range(4):  # into the second epoch
    got, want = folder.next_local(), reference.next_local()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
    for size, ids in zip(_sizes(got), got["input_ids"]):
      np.testing.assert_array_equal(ids, tokenize(tokenizer, captions[size])[0])


def test_imagefolder_in_csv_with_splits_and_another_caption_column(
  image_folder, tokenizer, tmp_path
):
  root, _, captions = image_folder
  split = tmp_path / "data" / "validation"
  split.mkdir(parents=True)
  (tmp_path / "data" / "train").mkdir()
  rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().split("\n") if line]
  for row in rows[:4]:
    name = row["file_name"].split("/")[-1]
    (split / name).write_bytes((root / row["file_name"]).read_bytes())
  # A quoted caption over two lines: CSV rows are parsed, not split at newlines.
  lines = ["file_name,caption"] + [
    f'{r["file_name"].split("/")[-1]},"{r["caption"]}\nTOO"' for r in rows[:4]
  ]
  (split / "metadata.csv").write_text("\n".join(lines) + "\n")
  source = open_source(str(tmp_path / "data"), split="validation")
  assert len(source) == 4 and source[0]["caption"] == rows[0]["caption"] + "\nTOO"
  spec = DataSpec(
    resolution=R, random_crop=False, clip=None, tokenizer=tokenizer, caption_key="caption"
  )
  batch = make_train_iterator(source, spec, global_batch_size=4, mesh=_mesh(), seed=0).next_local()
  for size, ids in zip(_sizes(batch), batch["input_ids"]):
    np.testing.assert_array_equal(ids, tokenize(tokenizer, captions[size].upper() + "\nTOO")[0])
  with pytest.raises(
    FileNotFoundError, match="no metadata.jsonl or metadata.csv for split 'train'"
  ):
    open_source(str(tmp_path / "data"))


def test_imagefolder_rows_that_cannot_be_read_are_skipped_counted_and_named(
  image_folder, tokenizer, tmp_path
):
  """Bugs: a bad metadata row or a missing image crashing the run; a path through '..' read."""
  root, _, _ = image_folder
  (tmp_path / "secret.jpg").write_bytes((root / "img" / "000000.jpg").read_bytes())
  lines = (root / "metadata.jsonl").read_text().split("\n")
  lines[1] = '{"file_name": "img/gone.jpg", "text": "a red circle"}'
  lines[3] = '{"file_name": "../secret.jpg", "text": "a red circle"}'
  lines[5] = '{"file_name": "img/000005.jpg", "text": '  # cut short
  folder = tmp_path / "folder"
  folder.mkdir()
  (folder / "img").symlink_to(root / "img")
  (folder / "metadata.jsonl").write_text("\n".join(lines))
  source = open_source(str(folder))
  assert "leaves the dataset folder" in source[3]["image"].reason
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=tokenizer)
  it = make_train_iterator(
    source, spec, global_batch_size=10, mesh=_mesh(), seed=0, max_bad_records=3
  )
  batch = it.next_local()
  assert it.skipped_records == 3 and len(batch["pixels"]) == 10
  it = make_train_iterator(
    source, spec, global_batch_size=10, mesh=_mesh(), seed=0, max_bad_records=2
  )
  with pytest.raises(ValueError) as error:
    it.next_local()
  assert "\n" not in str(error.value) and "more than max_bad_records=2" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Webdataset shards


def test_processes_read_disjoint_shards_and_see_every_record_once_per_epoch(shards, tokenizer):
  folder, captions = shards
  source = open_source(f"{folder}/{{00000..00002}}.tar")
  assert len(source.shards) == NUM_SHARDS and {"image", "text", "json"} <= set(source.features)
  seen = []
  for process in (0, 1):
    it = _stream(source, tokenizer, process, 2, num_epochs=1)
    batches = []
    while True:
      try:
        batches.append(it.next_local())
      except StopIteration:
        break
    sizes = [s for b in batches for s in _sizes(b)]
    order = streaming.shard_order(NUM_SHARDS, 5, 0, process, 2)
    assert len(sizes) == len(order) * PER_SHARD and len(set(sizes)) == len(sizes)
    for batch in batches:  # the captions travel with their images
      for size, ids in zip(_sizes(batch), batch["input_ids"]):
        np.testing.assert_array_equal(ids, tokenize(tokenizer, captions[size])[0])
    seen.append(set(sizes))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(captions)
  it = _stream(source, tokenizer, buffer=1)  # a buffer of one keeps the shards' own order
  first = [s for _ in range(PER_SHARD // 2) for s in _sizes(it.next_local())]
  start = streaming.shard_order(NUM_SHARDS, 5, 0, 0, 1)[0] * PER_SHARD
  assert first == [(17 + i, 40 - i // 2) for i in range(start, start + PER_SHARD)]


@pytest.mark.parametrize("stop_after", [3, 13])  # in the first epoch; some epochs later
def test_a_restored_stream_continues_with_exactly_the_next_batch(shards, tokenizer, stop_after):
  """2 processes (2 shards and 1): each restores its own position, its buffer read back."""
  folder, _ = shards
  source = open_source(str(folder))
  for process in (0, 1):
    reference = _stream(source, tokenizer, process, 2)
    want = [reference.next_local() for _ in range(stop_after + 4)]
    it = _stream(source, tokenizer, process, 2)
    for _ in range(stop_after):
      it.next_local()
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    position = state["positions"][str(process)]
    assert list(state["positions"]) == [str(process)] and position["buffer"]
    assert (position["epoch"] > 0) == (stop_after == 13)
    restored = _stream(source, tokenizer, process, 2, num_threads=3)
    restored.set_state(state)
    for batch in want[stop_after:]:
      got = restored.next_local()
      for key in batch:
        np.testing.assert_array_equal(got[key], batch[key])
    assert restored.step == stop_after + 4
    restored.close()
  other = _stream(source, tokenizer, 0, 2, buffer=6)
  with pytest.raises(ValueError, match="shuffle_buffer: saved 5, now 6"):
    other.set_state(state)
  with pytest.raises(ValueError, match="not one of a webdataset stream"):
    other.set_state({"format": "ipadapter_jax.TrainIterator/1"})


def test_worker_processes_give_the_same_stream(shards, tokenizer):
  folder, _ = shards
  source = open_source(str(folder))
  threads = _stream(source, tokenizer)
  want = [threads.next_local() for _ in range(3)]
  workers = _stream(source, tokenizer, worker_count=1)
  try:
    for batch in want:
      got = workers.next_local()
      for key in batch:
        np.testing.assert_array_equal(got[key], batch[key])
  finally:
    workers.close()


def test_undecodable_records_and_shards_are_skipped_counted_and_named(shards, tokenizer, tmp_path):
  """Bugs: a corrupt JPEG, a record without an image or a truncated shard stopping the run; a
  caption read from the record's json (caption_key="json/caption")."""
  folder, captions = shards
  examples = _examples(4, seed=3, first=NUM_SHARDS * PER_SHARD)
  records = [(k, _members(k, j, c)) for k, j, c, _ in examples]
  records[1][1]["jpg"] = b"\xff\xd8 not a jpeg"
  del records[2][1]["jpg"]
  _write_shard(tmp_path / "00000.tar", records)
  data = (folder / "00001.tar").read_bytes()
  (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2])  # truncated mid-shard
  source = open_source(str(tmp_path))
  whole = sum(1 for _ in tar_shards.read_records(str(tmp_path / "00001.tar"))) - 1
  assert 0 < whole < PER_SHARD
  good = 2 + whole  # records per epoch that decode: batches hold them all, one epoch at a time
  it = _stream(source, tokenizer, max_bad_records=10, caption_key="json/caption", buffer=2)
  sizes = []
  for _ in range(good):  # two epochs
    batch = it.next_local()
    for size, ids in zip(_sizes(batch), batch["input_ids"]):
      caption = captions.get(size) or next(c for *_, c, s in examples if s == size)
      np.testing.assert_array_equal(ids, tokenize(tokenizer, caption.upper())[0])
    sizes += _sizes(batch)
  assert sorted(sizes[:good]) == sorted(sizes[good:]) and len(set(sizes)) == good
  assert {examples[0][3], examples[3][3]} <= set(sizes)
  # Two bad records and the rest of the truncated shard, each epoch (the second's perhaps not
  # all yet: a skip counts with the batch it was skipped for).
  assert 3 <= it.skipped_records <= 6
  strict = _stream(source, tokenizer, num_epochs=1, max_bad_records=1, buffer=2)
  with pytest.raises(ValueError) as error:
    for _ in range(4):
      strict.next_local()
  message = str(error.value)
  assert "\n" not in message and "more than max_bad_records=1" in message, message
  assert "00000.tar byte" in message or "00001.tar" in message, message


def test_shards_on_gcs_stream_like_local_ones(shards, tokenizer, fake_gcs):  # noqa: F811
  folder, _ = shards
  for name in sorted(os.listdir(folder)):
    fake_gcs.pipe_file(f"bucket/shards/{name}", (folder / name).read_bytes())
  remote = open_source("gs://bucket/shards/{00000..00002}.tar")
  assert remote.shards[0] == "gs://bucket/shards/00000.tar"
  assert source_format("gs://bucket/shards") == "webdataset"
  local = _stream(open_source(str(folder)), tokenizer)
  it = _stream(remote, tokenizer)
  for _ in range(3):
    got, want = it.next_local(), local.next_local()
    np.testing.assert_array_equal(got["pixels"], want["pixels"])
  state = it.get_state()
  restored = _stream(remote, tokenizer)
  restored.set_state(state)
  np.testing.assert_array_equal(restored.next_local()["pixels"], local.next_local()["pixels"])
  for stream in (it, restored, local):  # their reading threads, before gs:// stops answering
    stream.close()


def test_a_stream_position_survives_an_orbax_checkpoint(shards, tokenizer, tmp_path):
  """The loop saves the iterator state with Orbax's JSON handler and restores it from there."""
  from ipadapter_jax.train.checkpoint import Checkpoints  # pylint: disable=import-outside-toplevel
  from tests.test_storage import _tiny_state  # pylint: disable=import-outside-toplevel

  folder, _ = shards
  source = open_source(str(folder))
  reference = _stream(source, tokenizer)
  want = [reference.next_local() for _ in range(4)]
  reference.close()
  it = _stream(source, tokenizer)
  for _ in range(2):
    it.next_local()
  checkpoints = Checkpoints(str(tmp_path / "checkpoints"), keep_last=1)
  checkpoints.save(2, _tiny_state(2), it.get_state(), force=True)
  checkpoints.wait()
  it.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tiny_state(0))
  _, data_state = checkpoints.restore(2, abstract)
  checkpoints.close()
  restored = _stream(source, tokenizer)
  restored.set_state(data_state)
  for batch in want[2:]:
    np.testing.assert_array_equal(restored.next_local()["pixels"], batch["pixels"])
  restored.close()


PROCESS_SCRIPT = """
import json, sys
import jax
from ipadapter_jax.data.batches import make_train_iterator
from ipadapter_jax.data.input_pipeline import DataSpec, open_source
from ipadapter_jax.tokenizer import load_tokenizer
folder, words, port, process = sys.argv[1:]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", 2, int(process))
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
spec = DataSpec(16, True, None, load_tokenizer(words))
it = make_train_iterator(open_source(folder), spec, global_batch_size=4, mesh=mesh, seed=5,
                         shuffle_buffer=5)
for _ in range(3):
  batch = next(it)
print(json.dumps(it.get_state()))
it.close()
"""


def test_the_state_of_a_multi_process_run_holds_every_process_position(shards, tokenizer, tmp_path):
  """Two JAX processes (jax.distributed over localhost): every process saves the positions of
  both, and each position restores that process's stream exactly."""
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  folder, _ = shards
  words = tmp_path / "words"
  tokenizer.save_pretrained(str(words))
  script = tmp_path / "process.py"
  script.write_text(PROCESS_SCRIPT)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workers = [
    subprocess.Popen(
      [sys.executable, str(script), str(folder), str(words), str(port), str(i)],
      cwd=root,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    for i in range(2)
  ]
  states = []
  for worker in workers:
    out, err = worker.communicate(timeout=180)
    assert worker.returncode == 0, err.decode()[-3000:]
    states.append(json.loads(out.decode().strip().splitlines()[-1]))
  assert states[0] == states[1] and sorted(states[0]["positions"]) == ["0", "1"]
  source = open_source(str(folder))
  for process in (0, 1):
    reference = _stream(source, tokenizer, process, 2)
    want = [reference.next_local() for _ in range(5)]
    reference.close()
    restored = _stream(source, tokenizer, process, 2)
    restored.set_state(states[0])
    for batch in want[3:]:
      np.testing.assert_array_equal(restored.next_local()["pixels"], batch["pixels"])
    restored.close()


def test_input_benchmark_measures_every_format_beside_the_tpu_need(tmp_path):
  import sys  # pylint: disable=import-outside-toplevel

  sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
  )
  import input_pipeline  # pylint: disable=import-outside-toplevel

  out = tmp_path / "rates.json"
  input_pipeline.main(
    [
      "--num_images",
      "8",
      "--resolutions",
      "32",
      "--batch_size",
      "4",
      "--batches",
      "1",
      "--shards",
      "2",
      "--out",
      str(out),
      "--formats",
      "imagefolder",
      "webdataset",
      "cache",
    ]
  )
  result = json.loads(out.read_text())
  assert [r["format"] for r in result["rows"]] == [
    "imagefolder",
    "webdataset",
    "cache float32",
    "cache bfloat16",
  ]
  assert all(r["examples_per_s"] > 0 for r in result["rows"])
  need = result["tpu_need"]  # 64 chips x 8 over the roofline step time, over 16 hosts
  assert need["global_batch"] == 512 and need["hosts"] == 16
  assert need["per_host"] == pytest.approx(512 / need["step_s"] / 16) and 300 < need["per_host"]
