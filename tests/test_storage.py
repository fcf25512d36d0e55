"""Run outputs on local paths and gs:// URIs: every storage function, MetricsWriter, Orbax and a
whole training run against filesystems that are not the local disk.

Two stand-ins for Cloud Storage run here: an in-memory fsspec filesystem registered for gs://
(what etils.epath uses when TensorFlow is absent), and, where Orbax writes arrays through
tensorstore's own GCS client, a local GCS emulator that gcsfs and tensorstore both talk to.
Each test runs from an empty folder, so a write that bypasses storage shows as a local `gs:`.
"""

import importlib
import json
import os
import socket
import struct
from http import HTTPStatus

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from ipadapter_jax import storage
from ipadapter_jax.train import metrics as metrics_lib
from ipadapter_jax.train.metrics import MetricsWriter

RUN = "gs://bucket/run"
# (`fsspec.registry` itself names the read-only view of this dict)
_FSSPEC_REGISTRY = importlib.import_module(  # pylint: disable=protected-access
  "fsspec.registry"
)._registry


class FakeGCS(MemoryFileSystem):
  """An in-memory filesystem answering gs:// paths; like an object store, it cannot append."""

  protocol = ("gs", "gcs")
  store = {}  # apart from the plain memory:// filesystem's
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    return super()._strip_protocol(str(path).removeprefix("gs://").removeprefix("gcs://"))

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError(f"{path}: object stores cannot append")
    return super()._open(path, mode, **kwargs)

  def files(self) -> dict[str, bytes]:
    """{"bucket/key": contents} of every object."""
    return {k.lstrip("/"): f.getvalue() for k, f in self.store.items()}


def _serve_gs_with(monkeypatch, filesystem_class):
  """Makes `filesystem_class` the one behind gs:// paths until the test ends."""
  for name in ("gs", "gcs"):
    # fsspec has no public way to unregister; monkeypatch restores its registry exactly.
    monkeypatch.setitem(_FSSPEC_REGISTRY, name, filesystem_class)
  _forget_epath_filesystems()


def _forget_epath_filesystems():
  """epath keeps the first filesystem it made for gs://: each test must get its own."""
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """gs:// served from memory; the test runs in an empty folder `tmp_path/cwd`."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setattr(FakeGCS, "store", {})
  monkeypatch.setattr(FakeGCS, "pseudo_dirs", [""])
  _serve_gs_with(monkeypatch, FakeGCS)
  yield FakeGCS()
  _forget_epath_filesystems()


def _nothing_local(cwd="."):
  """Whether no path like `gs:/bucket/...` was written below the working folder."""
  return not [name for name in os.listdir(cwd) if name.startswith("gs:")]


# ----- storage on its own ------------------------------------------------------------------


def test_paths_keep_uris_and_make_local_paths_absolute(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  assert storage.is_remote("gs://b/x") and storage.is_remote("s3://b/x")
  assert not storage.is_remote("runs/x") and not storage.is_remote("/abs/x")
  assert storage.resolve("gs://b/x/") == "gs://b/x/"
  assert storage.resolve("runs/x") == os.path.join(str(tmp_path), "runs", "x")
  assert storage.join("gs://b/run", "samples", "1.png") == "gs://b/run/samples/1.png"
  assert storage.join("gs://b/run/", "a") == "gs://b/run/a"
  assert storage.join("runs/x", "a", "b") == os.path.join("runs/x", "a", "b")


def test_every_function_writes_to_the_remote_filesystem(fake_gcs):
  storage.makedirs(RUN)
  storage.makedirs(RUN)  # an existing folder is fine
  assert storage.exists(RUN) and storage.isdir(RUN)
  storage.write_text(storage.join(RUN, "config.json"), '{"a": 1}')
  storage.write_bytes(storage.join(RUN, "samples", "step_1.png"), b"\x89PNG")
  storage.append_text(storage.join(RUN, "metrics.jsonl"), "1\n")
  storage.append_text(storage.join(RUN, "metrics.jsonl"), "2\n")
  assert storage.listdir(RUN) == ["config.json", "metrics.jsonl", "samples"]
  assert storage.isdir(storage.join(RUN, "samples"))
  assert not storage.isdir(storage.join(RUN, "config.json"))
  assert storage.read_text(storage.join(RUN, "config.json")) == '{"a": 1}'
  assert not storage.exists(storage.join(RUN, "missing"))
  assert fake_gcs.files() == {
    "bucket/run/config.json": b'{"a": 1}',
    "bucket/run/samples/step_1.png": b"\x89PNG",
    "bucket/run/metrics.jsonl": b"1\n2\n",
  }
  storage.remove(storage.join(RUN, "samples"))
  storage.remove(storage.join(RUN, "config.json"))
  storage.remove(storage.join(RUN, "missing"))  # nothing there is fine
  assert list(fake_gcs.files()) == ["bucket/run/metrics.jsonl"]
  assert _nothing_local()


def test_local_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
  path = str(tmp_path / "out" / "config.json")
  storage.write_text(path, "old")
  storage.write_text(path, "new")
  assert storage.read_text(path) == "new"
  with pytest.raises(RuntimeError):
    with storage.staged(path) as local:
      with open(local, "w") as f:
        f.write("half")
      raise RuntimeError("the writer failed")
  assert storage.read_text(path) == "new"
  storage.append_text(path, "!")
  assert storage.read_text(path) == "new!"
  assert os.listdir(tmp_path / "out") == ["config.json"]


@pytest.mark.parametrize("where", ["local", "remote"])
def test_staged_file_and_folder_appear_whole(fake_gcs, tmp_path, where):
  root = RUN if where == "remote" else str(tmp_path / "run")
  with storage.staged(storage.join(root, "ip_adapter.safetensors")) as local:
    assert not storage.is_remote(local)
    with open(local, "wb") as f:
      f.write(b"weights")
  assert storage.read_text(storage.join(root, "ip_adapter.safetensors")) == "weights"
  folder = storage.join(root, "pipeline")
  for files in ({"model_index.json": "{1}", "unet/config.json": "u"}, {"model_index.json": "{2}"}):
    with storage.staged(folder) as local:
      for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(local, name)), exist_ok=True)
        with open(os.path.join(local, name), "w") as f:
          f.write(text)
    assert storage.listdir(folder) == sorted({name.split("/")[0] for name in files})
  assert storage.listdir(folder) == ["model_index.json"]  # the first folder's files are gone
  assert storage.read_text(storage.join(root, "pipeline", "model_index.json")) == "{2}"
  if where == "remote":
    assert sorted(fake_gcs.files()) == [
      "bucket/run/ip_adapter.safetensors",
      "bucket/run/pipeline/model_index.json",
    ]
  assert _nothing_local()


@pytest.mark.parametrize("where", ["local", "remote"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_staged_failure_leaves_nothing(fake_gcs, tmp_path, where, kind):
  target = storage.join(RUN if where == "remote" else str(tmp_path / "run"), "out")
  with pytest.raises(RuntimeError):
    with storage.staged(target) as local:
      staging = os.path.dirname(local)
      if kind == "folder":
        os.makedirs(local)
        local = os.path.join(local, "part.bin")
      with open(local, "wb") as f:
        f.write(b"half")
      raise RuntimeError("the writer failed")
  assert not storage.exists(target) and not os.path.exists(staging)
  if where == "remote":
    assert fake_gcs.files() == {}
  else:
    assert os.listdir(tmp_path / "run") == []


def test_staged_upload_failing_part_way_leaves_nothing(fake_gcs, monkeypatch):
  write = FakeGCS._open

  def failing(self, path, mode="rb", **kwargs):
    if "w" in mode and path.endswith("2.bin"):
      raise OSError("connection reset")
    return write(self, path, mode, **kwargs)

  monkeypatch.setattr(FakeGCS, "_open", failing)
  with pytest.raises(OSError, match="connection reset"):
    with storage.staged(storage.join(RUN, "pipeline")) as local:
      os.makedirs(local)
      for name in ("1.bin", "2.bin"):
        with open(os.path.join(local, name), "wb") as f:
          f.write(b"w")
  assert not storage.exists(storage.join(RUN, "pipeline")) and fake_gcs.files() == {}


def test_staged_without_a_result_is_an_error(fake_gcs):
  with pytest.raises(FileNotFoundError):
    with storage.staged(storage.join(RUN, "never_written")):
      pass
  assert fake_gcs.files() == {}


# ----- outputs never replace what they did not write ---------------------------------------

MALFORMED = [
  "gs:/bucket/x",
  "gs:bucket/x",
  "foo://x",
  "gcs://bucket/x",
  "GS://bucket/x",
  "gs://",
  "gs:///x",
  "gs://Bucket/x",
  "gs://bucket//x",
  "runs:x",
]


@pytest.mark.parametrize("path", MALFORMED)
def test_malformed_urls_are_refused_in_one_line_and_create_nothing(fake_gcs, path):
  """Catches `gs:/bucket` (one slash), `gs:x`, unknown schemes and the like becoming a local
  folder named `gs:` (or `foo:`) instead of an error."""
  for call in (
    storage.resolve,
    lambda p: storage.check_output(p, "cmd"),
    lambda p: storage.staged(p, "cmd").__enter__(),
    storage.write_bytes,
  ):
    args = (path,) if call is not storage.write_bytes else (path, b"x")
    with pytest.raises(ValueError) as error:
      call(*args)
    message = str(error.value)
    assert "\n" not in message and path in message, message
  assert os.listdir(".") == [] and fake_gcs.files() == {}


def test_well_formed_paths_pass_and_colon_names_are_local_with_dot_slash(tmp_path):
  assert storage.resolve("gs://bucket/x") == "gs://bucket/x"
  assert storage.resolve("s3://my-bucket.1/a/b/") == "s3://my-bucket.1/a/b/"
  assert storage.resolve("./gs:/x") == os.path.abspath("gs:/x")
  assert storage.resolve(str(tmp_path / "a:b")) == str(tmp_path / "a:b")
  with pytest.raises(ValueError, match=r"write \./runs:x"):
    storage.resolve("runs:x")


def _folder(root, files: dict) -> str:
  for name, text in files.items():
    os.makedirs(os.path.dirname(os.path.join(root, name)) or ".", exist_ok=True)
    with open(os.path.join(root, name), "w") as f:
      f.write(text)
  return root


def _write_folder(target, files: dict, command="cmd", **kwargs):
  with storage.staged(target, command, **kwargs) as local:
    os.makedirs(local)
    _folder(local, files)


def _tree(root) -> dict:
  """{relative path: text} of every file below `root` (local or remote)."""
  files = storage._files(root)  # pylint: disable=protected-access
  return {f: storage.read_text(storage.join(root, f)) for f in files}


@pytest.mark.parametrize("where", ["local", "remote"])
def test_an_output_folder_replaces_only_its_own_earlier_output(fake_gcs, tmp_path, where):
  """Catches an output replacing a user's folder, another command's output, or its own output
  once a user has added a file to it; and a rerun that cannot replace its own output."""
  root = RUN if where == "remote" else str(tmp_path)
  out = storage.join(root, "out")
  _write_folder(out, {"a.bin": "1", "sub/b.json": "2"})
  marker = json.loads(storage.read_text(storage.join(out, storage.MARKER)))
  assert marker["command"] == "cmd" and marker["files"] == ["a.bin", "sub/b.json"]
  _write_folder(out, {"c.bin": "3"})  # a rerun replaces its own output
  assert _tree(out) == {
    ".ipadapter_jax": storage.read_text(storage.join(out, storage.MARKER)),
    "c.bin": "3",
  }
  mine = storage.join(root, "mine")
  for name, text in {"notes.txt": "mine", "data/x.csv": "1,2"}.items():
    storage.write_text(storage.join(mine, name), text)
  storage.write_text(storage.join(out, "notes.txt"), "added by the user")
  for target, command, problem in [
    (mine, "cmd", "'data', 'notes.txt', which cmd did not write"),
    (out, "cmd", "'notes.txt', which cmd did not write there"),
    (out, "other", "output of another command (cmd)"),
  ]:
    before = _tree(target)
    ran = []
    with pytest.raises(ValueError) as error:
      with storage.staged(target, command) as local:
        ran.append(local)
    message = str(error.value)
    assert problem in message and "--out" in message and target in message, message
    assert "\n" not in message and not ran and _tree(target) == before
  assert _nothing_local()


def test_an_empty_folder_is_written_in_place_even_as_the_working_folder(tmp_path, monkeypatch):
  """Catches `--out .` in an empty folder swapping the working folder for another one (the
  shell is left in a deleted folder), and a link to a folder being replaced by a folder."""
  here = tmp_path / "here"
  here.mkdir()
  monkeypatch.chdir(here)
  _write_folder(".", {"a.bin": "1"})
  assert sorted(os.listdir(".")) == [".ipadapter_jax", "a.bin"]  # the same folder, written
  _write_folder(".", {"b.bin": "2"})
  assert sorted(os.listdir(".")) == [".ipadapter_jax", "b.bin"]
  os.symlink(here, tmp_path / "link")
  _write_folder(str(tmp_path / "link"), {"c.bin": "3"})
  assert os.path.islink(tmp_path / "link") and sorted(os.listdir(here)) == [
    ".ipadapter_jax",
    "c.bin",
  ]


@pytest.mark.parametrize("where", ["local", "remote"])
def test_an_existing_file_is_replaced_only_with_overwrite(fake_gcs, tmp_path, where):
  root = RUN if where == "remote" else str(tmp_path)
  path = storage.join(root, "y.safetensors")
  storage.write_text(path, "mine")
  with pytest.raises(ValueError, match=r"exists: pass --overwrite to replace it"):
    with storage.staged(path, "cmd", folder=False) as local:
      pytest.fail(f"the writer ran: {local}")
  assert storage.read_text(path) == "mine"
  with storage.staged(path, "cmd", folder=False, overwrite=True) as local:
    with open(local, "w") as f:
      f.write("new")
  assert storage.read_text(path) == "new"
  with pytest.raises(ValueError, match="is a folder"):
    storage.check_output(root, "cmd", folder=False, overwrite=True)


def _failing_open_on(name, seen, final, error=OSError):
  """FakeGCS._open failing when `name` is uploaded, recording the objects under `final` then."""
  write = FakeGCS._open

  def failing(self, path, mode="rb", **kwargs):
    if "w" in mode:
      seen.append(sorted(k for k in FakeGCS().files() if k.startswith(final)))
      if path.endswith(name):
        raise error("connection reset")
    return write(self, path, mode, **kwargs)

  return failing


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_remote_uploads_go_under_a_temporary_name_first(fake_gcs, monkeypatch, error):
  """Catches an upload written straight to its final name: an interruption part way leaves
  objects there that pass for a result, or destroys the earlier output before the new one
  is complete."""
  out = storage.join(RUN, "pipeline")
  _write_folder(out, {"1.bin": "old"})
  earlier = _tree(out)
  seen = []
  monkeypatch.setattr(
    FakeGCS, "_open", _failing_open_on("2.bin", seen, "bucket/run/pipeline/", error)
  )
  with pytest.raises(error, match="connection reset"):
    _write_folder(out, {"1.bin": "new", "2.bin": "new"})
  assert seen and all(s == sorted(f"bucket/run/pipeline/{f}" for f in earlier) for s in seen)
  assert _tree(out) == earlier  # the earlier output is untouched
  assert sorted(fake_gcs.files()) == [f"bucket/run/pipeline/{f}" for f in sorted(earlier)]


def test_remote_commit_failing_part_way_leaves_nothing_under_the_final_name(fake_gcs, monkeypatch):
  copy, copied = FakeGCS.cp_file, []

  def failing(self, path1, path2, **kwargs):
    if copied:
      raise OSError("connection reset")
    copied.append(path2)
    return copy(self, path1, path2, **kwargs)

  monkeypatch.setattr(FakeGCS, "cp_file", failing)
  with pytest.raises(OSError, match="connection reset"):
    _write_folder(storage.join(RUN, "pipeline"), {"1.bin": "1", "2.bin": "2"})
  assert copied and fake_gcs.files() == {}


def test_run_export_refuses_a_folder_the_run_did_not_write(tmp_path, monkeypatch):
  """Catches the end-of-run export replacing a user's `vae/` (or `pipeline/`) in the work
  directory; the run's own earlier export is replaced."""
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel

  from ipadapter_jax.train import outputs  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(outputs, "save_vae", lambda vae, local: _folder(local, {"config.json": vae}))
  cfg, sd = SimpleNamespace(), SimpleNamespace(unet=None, vae="trained")
  workdir = str(tmp_path / "run")
  _folder(os.path.join(workdir, "vae"), {"notes.txt": "mine"})
  with pytest.raises(ValueError, match=r"--workdir .*vae: this folder holds 'notes.txt'"):
    outputs.check_export(cfg, sd, workdir)
  with pytest.raises(ValueError, match="notes.txt"):
    outputs.export(cfg, sd, workdir)
  assert os.listdir(os.path.join(workdir, "vae")) == ["notes.txt"]
  os.remove(os.path.join(workdir, "vae", "notes.txt"))
  assert outputs.export(cfg, sd, workdir) == [os.path.join(workdir, "vae")]
  sd.vae = "trained again"
  outputs.check_export(cfg, sd, workdir)
  outputs.export(cfg, sd, workdir)  # a resumed run replaces its own export
  assert storage.read_text(os.path.join(workdir, "vae", "config.json")) == "trained again"


# ----- MetricsWriter -----------------------------------------------------------------------


def _events(data: bytes) -> list:
  """The Event protos of a TensorBoard event file (TFRecord framing; checksums not checked)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  events, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset : offset + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[offset + 12 : offset + 12 + length])
    events.append(event)
    offset += 12 + length + 4
  return events


def _remote_events(fake_gcs) -> dict[str, list]:
  return {
    name.rsplit("/", 1)[1]: _events(data)
    for name, data in fake_gcs.files().items()
    if name.startswith("bucket/run/tensorboard/")
  }


def _scalars(events) -> list[tuple[int, str]]:
  return [(e.step, v.tag) for e in events for v in e.summary.value if v.HasField("simple_value")]


def test_metrics_writer_on_a_remote_workdir(fake_gcs):
  writer = MetricsWriter(RUN)
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": 1.0 / step})
  # events are uploaded with the writes (the newest may wait for the next), so a run that dies
  # keeps them
  assert len(_remote_events(fake_gcs)) == 1
  writer.write_image(4, "samples", np.zeros((8, 12, 3), np.uint8))
  writer.close()
  lines = storage.read_text(storage.join(RUN, "metrics.jsonl")).splitlines()
  assert [json.loads(line) for line in lines] == [{"step": s, "loss": 1 / s} for s in (1, 2, 3, 4)]
  (first,) = _remote_events(fake_gcs).values()
  assert _scalars(first) == [(step, "loss") for step in (1, 2, 3, 4)]
  assert any(v.tag == "samples" and v.HasField("image") for e in first for v in e.summary.value)

  writer = MetricsWriter(RUN, resume_step=2)  # steps 3 and 4 run again
  assert storage.read_text(storage.join(RUN, "metrics.jsonl")) == "\n".join(lines[:2]) + "\n"
  writer.write(3, {"loss": 0.5})
  writer.close()
  assert [
    json.loads(line)["step"]
    for line in storage.read_text(storage.join(RUN, "metrics.jsonl")).splitlines()
  ] == [1, 2, 3]
  events = _remote_events(fake_gcs)
  assert len(events) == 2  # the first run's file is kept, not replaced
  second = next(e for name, e in events.items() if _scalars(e) == [(3, "loss")])
  assert any(e.session_log.status == e.session_log.START for e in second)  # purges steps >= 3
  assert set(fake_gcs.files()) == {
    "bucket/run/metrics.jsonl",
    *(f"bucket/run/tensorboard/{name}" for name in events),
  }
  assert _nothing_local()


def test_metrics_writer_starts_new_remote_event_files_when_large(fake_gcs, monkeypatch):
  monkeypatch.setattr(metrics_lib, "_REMOTE_EVENT_FILE_BYTES", 300)
  writer = MetricsWriter(RUN)
  for step in range(1, 21):
    writer.write(step, {"loss": float(step), "grad_norm": 0.0})
  writer.close()
  events = _remote_events(fake_gcs)
  assert len(events) > 2
  assert sorted(s for name in sorted(events) for s in _scalars(events[name])) == sorted(
    (step, tag) for step in range(1, 21) for tag in ("grad_norm", "loss")
  )


def test_metrics_writer_on_a_local_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  writer = MetricsWriter(workdir)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0})
  writer.close()
  MetricsWriter(workdir, resume_step=1).close()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1]
  assert [n for n in os.listdir(os.path.join(workdir, "tensorboard")) if "tfevents" in n]


# ----- Orbax, through a local GCS emulator --------------------------------------------------
# Orbax writes its metadata through epath (gcsfs here) but the arrays through tensorstore's own
# GCS client: both are pointed at one emulator on localhost.


def _with_generation_headers(download):
  """The emulator's media download, plus the generation headers Cloud Storage sends with every
  download. tensorstore takes an object's generation from them: without them a read reports
  generation 0, and a conditional write after it fails with "Malformed StorageGeneration" (OCDBT
  updating a manifest it has re-read, which Orbax does at times, not at every save)."""

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]

  return download_with_generation


@pytest.fixture(scope="module")
def gcs_emulator_url():
  """A Cloud Storage emulator on a free localhost port, with a bucket named `bucket`."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  url = f"http://localhost:{port}"
  with pytest.MonkeyPatch.context() as env:
    env.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs and google-cloud-storage
    env.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore: no credential lookup
    env.setenv("NO_GCE_CHECK", "True")  # google-auth: no metadata server probe
    # gcsfs's default class asks a gRPC API the emulator lacks for each bucket's layout (slow,
    # and noisy); it is chosen when gcsfs is imported.
    env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # `?alt=media` reads, tensorstore's, go through `objects.get`, which looks `download` up here.
    env.setattr(objects, "download", _with_generation_headers(objects.download))
    server = create_server("localhost", port, in_memory=True, default_bucket="bucket")
    server.start()
    try:
      yield url
    finally:
      server.stop()


@pytest.fixture
def gcs_emulator(gcs_emulator_url, monkeypatch, tmp_path):
  """gs:// served by the emulator (emptied first); the test runs in an empty folder."""
  import gcsfs  # pylint: disable=import-outside-toplevel

  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  gcsfs.GCSFileSystem.clear_instance_cache()
  _serve_gs_with(monkeypatch, gcsfs.GCSFileSystem)
  fs = gcsfs.GCSFileSystem()
  for path in fs.ls("bucket", refresh=True):
    fs.rm(path, recursive=True)
  yield fs
  _forget_epath_filesystems()
  gcsfs.GCSFileSystem.clear_instance_cache()


def _tiny_state(step: int):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from ipadapter_jax.train.step import TrainState  # pylint: disable=import-outside-toplevel

  params = {"unet": {"down.0.to_k_ip": {"kernel": jnp.full((2, 3), float(step))}}}
  return TrainState(jnp.asarray(step, jnp.int32), params, {"mu": jnp.arange(3.0) * step}, None)


def test_emulator_reads_carry_the_generation_a_conditional_write_needs(gcs_emulator):
  """OCDBT updates a manifest by reading it, then writing only if it is unchanged."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel

  kvstore = ts.KvStore.open({"driver": "gcs", "bucket": "bucket"}).result()
  written = kvstore.write("run/manifest", b"1").result()
  read = kvstore.read("run/manifest").result()
  assert read.stamp.generation == written.generation
  kvstore.write("run/manifest", b"2", if_equal=read.stamp.generation).result()
  assert kvstore.read("run/manifest").result().value == b"2"


def test_orbax_checkpoints_on_gcs(gcs_emulator):
  import jax  # pylint: disable=import-outside-toplevel

  from ipadapter_jax.train.checkpoint import Checkpoints  # pylint: disable=import-outside-toplevel

  directory = storage.join(RUN, "checkpoints")
  checkpoints = Checkpoints(directory, keep_last=1)
  assert checkpoints.directory == directory and checkpoints.latest_step() is None
  for step in (1, 2):
    checkpoints.save(step, _tiny_state(step), {"position": step}, force=True)
  checkpoints.wait()
  checkpoints.close()
  assert storage.listdir(directory) == ["2"]  # the older one was deleted on GCS
  assert gcs_emulator.exists("bucket/run/checkpoints/2/params/manifest.ocdbt")

  checkpoints = Checkpoints(directory, keep_last=1)
  assert checkpoints.latest_step() == 2
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tiny_state(0))
  state, data_state = checkpoints.restore(2, abstract)
  checkpoints.close()
  assert data_state == {"position": 2} and int(state.step) == 2
  expected = _tiny_state(2)
  np.testing.assert_array_equal(state.opt_state["mu"], expected.opt_state["mu"])
  np.testing.assert_array_equal(
    state.params["unet"]["down.0.to_k_ip"]["kernel"],
    expected.params["unet"]["down.0.to_k_ip"]["kernel"],
  )
  assert _nothing_local()


def test_training_run_writes_every_output_through_storage(gcs_emulator, tiny_world, tiny_dataset):
  from ipadapter_jax.train.loop import train  # pylint: disable=import-outside-toplevel
  from tests.test_train import tiny_config  # pylint: disable=import-outside-toplevel

  config = tiny_config(
    tiny_world,
    tiny_dataset,
    num_steps=2,
    sample_every=2,
    sample_images=(str(tiny_world / "prompt.png"),),
    sample_steps=2,
  )
  train(config, RUN)
  assert json.loads(storage.read_text(storage.join(RUN, "config.json")))["num_steps"] == 2
  lines = storage.read_text(storage.join(RUN, "metrics.jsonl")).splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]
  events = storage.listdir(storage.join(RUN, "tensorboard"))
  assert events and all("tfevents" in name for name in events)
  assert storage.listdir(storage.join(RUN, "samples")) == ["step_0000002.png"]
  assert storage.exists(storage.join(RUN, "ip_adapter.safetensors"))
  assert storage.listdir(storage.join(RUN, "checkpoints")) == ["2"]
  assert {"data", "params", "state"} <= set(storage.listdir(storage.join(RUN, "checkpoints", "2")))
  assert gcs_emulator.exists("bucket/run/checkpoints/2/params/manifest.ocdbt")
  assert _nothing_local()


def test_convert_reads_only_finalized_checkpoints(gcs_emulator, tiny_world, tiny_dataset):
  """On Cloud Storage a step folder has its final name while Orbax writes it, and counts only
  once `commit_success.txt` is in it: resume and `convert` must skip a newer step without one
  (a save cut short), where taking the newest numbered folder would read a half-written one."""
  from ipadapter_jax.train.checkpoint import Checkpoints  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.train.loop import train  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.weights import adapter_checkpoint  # pylint: disable=import-outside-toplevel
  from tests.test_train import tiny_config  # pylint: disable=import-outside-toplevel

  train(tiny_config(tiny_world, tiny_dataset, num_steps=2, checkpoint_every=2), RUN)
  gcs_emulator.copy("bucket/run/checkpoints/2", "bucket/run/checkpoints/3", recursive=True)
  gcs_emulator.rm("bucket/run/checkpoints/3/commit_success.txt")
  gcs_emulator.invalidate_cache()
  assert gcs_emulator.exists("bucket/run/checkpoints/3/params/manifest.ocdbt")
  assert adapter_checkpoint._weights_item(RUN) == storage.join(RUN, "checkpoints", "2", "params")
  checkpoints = Checkpoints(storage.join(RUN, "checkpoints"), keep_last=3)
  assert checkpoints.latest_step() == 2
  checkpoints.close()


def test_convert_writes_to_gcs_under_its_final_name_only_once_complete(
  gcs_emulator, tiny_world, capsys
):
  """Catches `to-official --out gs://...` written to a local `gs:` folder while reporting the
  URI as written, temporary objects left in the bucket, and a remote output folder replacing
  a user's objects."""
  from ipadapter_jax.cli import convert  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.weights import read_ip_adapter  # pylint: disable=import-outside-toplevel

  source = str(tiny_world / "adapter" / "ip-adapter.safetensors")
  to_jax = ["to-jax", source, "--unet", str(tiny_world / "sd"), "--out", "gs://bucket/ckpt"]
  assert convert.main(to_jax) == 0
  assert convert.main(to_jax) == 0  # its own earlier output: replaced
  to_official = ["to-official", "gs://bucket/ckpt", "--out", "gs://bucket/y.safetensors"]
  assert convert.main(to_official) == 0
  out = capsys.readouterr().out
  assert "wrote gs://bucket/ckpt" in out and "wrote gs://bucket/y.safetensors" in out
  assert sorted(gcs_emulator.ls("bucket", refresh=True)) == ["bucket/ckpt", "bucket/y.safetensors"]
  assert gcs_emulator.exists("bucket/ckpt/.ipadapter_jax")
  with open("y.safetensors", "wb") as f:  # read back here, then removed
    f.write(gcs_emulator.cat("bucket/y.safetensors"))
  back, original = read_ip_adapter("y.safetensors"), read_ip_adapter(source)
  os.remove("y.safetensors")
  assert set(back) == set(original)
  for key, value in original.items():
    np.testing.assert_allclose(back[key], value, rtol=1e-3, atol=1e-6, err_msg=key)
  assert os.listdir(".") == []  # nothing written locally

  gcs_emulator.pipe("bucket/mine/notes.txt", b"mine")
  assert convert.main([*to_jax[:-1], "gs://bucket/mine"]) == 1
  # (the emulator's thread may print a client's closed connection here too)
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert len(err) == 1 and "notes.txt" in err[0] and "gs://bucket/mine" in err[0], err
  assert gcs_emulator.find("bucket/mine", refresh=True) == ["bucket/mine/notes.txt"]
  assert convert.main(to_official) == 1
  assert "--overwrite" in capsys.readouterr().err
