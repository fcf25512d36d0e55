"""Training: sharded step parity, exact resumption, SIGTERM, NaN, checkpoint contents, loss."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from ipadapter_jax.configs import sd15_ip_adapter
from ipadapter_jax.train.checks import TrainingError
from ipadapter_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(world, dataset, **overrides) -> ml_collections.ConfigDict:
  c = sd15_ip_adapter.get_config()
  c.model.pretrained = str(world / "sd")
  c.model.image_encoder = str(world / "adapter" / "image_encoder")
  c.data.source = dataset
  c.data.resolution = 32
  c.batch_size = 8
  c.num_steps = 6
  c.log_every = 1
  c.checkpoint_every = 2
  c.keep_last = 10
  c.keep_every = 0
  c.sample_every = 0
  c.optimizer.learning_rate = 1e-3
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _train_command(config, workdir):
  path = os.path.join(workdir, "config.py")
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    f.write(
      "import json\nimport ml_collections\n\n\ndef get_config():\n"
      f"  return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n"
    )
  return [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    f"--config={path}",
    f"--workdir={workdir}",
  ]


def _wait_for(predicate, process, timeout=120):
  start = time.time()
  while not predicate():
    assert process.poll() is None, "the run ended early"
    assert time.time() - start < timeout, "timed out"
    time.sleep(0.05)


def test_resume_after_sigkill_and_sigterm(tiny_world, tiny_dataset, tmp_path):
  config = tiny_config(tiny_world, tiny_dataset)
  reference = str(tmp_path / "reference")
  train(config, reference)
  expected = _metrics(reference)
  assert [m["step"] for m in expected] == list(range(1, 7))

  run = str(tmp_path / "interrupted")
  ckpt = os.path.join(run, "checkpoints")
  process = subprocess.Popen(_train_command(config, run), cwd=ROOT, stderr=subprocess.DEVNULL)
  _wait_for(lambda: os.path.isdir(os.path.join(ckpt, "2")) and len(_metrics(run)) >= 3, process)
  process.send_signal(signal.SIGKILL)  # mid-run, after the checkpoint of step 2
  process.wait()
  restarted = time.time()
  process = subprocess.Popen(
    _train_command(config, run), cwd=ROOT, stderr=subprocess.DEVNULL, stdout=subprocess.PIPE
  )
  metrics_path = os.path.join(run, "metrics.jsonl")
  _wait_for(
    lambda: (
      os.path.getmtime(metrics_path) > restarted  # the restarted run has logged
      and _metrics(run)[-1]["step"] >= 3
    ),
    process,
  )
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 143  # 128 + SIGTERM: "preempted, run again", not "finished"
  summary = json.loads(out.decode().strip().splitlines()[-1])
  assert summary["stopped_by_signal"] and str(summary["step"]) in os.listdir(ckpt)
  train(config, run)  # the same command again finishes the run
  timing = lambda rows: [{k: v for k, v in r.items() if k != "examples_per_second"} for r in rows]
  assert timing(_metrics(run)) == timing(expected)  # every step's loss, to the last digit
  assert os.path.exists(os.path.join(run, "ip_adapter.safetensors"))


def test_a_signal_during_sampling_stops_at_the_next_step_with_a_checkpoint(
  tiny_world, tiny_dataset, tmp_path, monkeypatch, capsys
):
  """SIGTERM while the step-3 sample grid is drawn: the run saves step 4 and stops there (it
  used to leave at step 3 unsaved). Then a resume: a changed learning rate is refused with the
  key, old and new; a corrupt latest checkpoint is refused naming the step before it, with the
  run's files left as they were; a torn last metrics line is dropped with a warning; and with
  the corrupt step moved aside the run resumes and extends to num_steps=8 (a key a resume may
  change)."""
  import shutil

  from ipadapter_jax.train import loop
  from ipadapter_jax.weights.files import CheckpointError

  signals = [signal.SIGTERM]  # one, the first time step 3's grid is drawn

  class SignalWhileSampling:
    def __init__(self, *args):
      pass

    def __call__(self, step, weights):
      if step == 3 and signals:
        os.kill(os.getpid(), signals.pop())

  monkeypatch.setattr(loop, "SampleGrids", SignalWhileSampling)
  run = tmp_path / "run"
  config = tiny_config(tiny_world, tiny_dataset, sample_every=3)
  summary = train(config, str(run))
  assert summary["stopped_by_signal"] and summary["signal"] == "SIGTERM"
  assert summary["step"] == 4 and "exported" not in summary
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
  assert "stopped by SIGTERM after step 4: checkpoint 4 is saved" in capsys.readouterr().err
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handed back

  with pytest.raises(
    TrainingError,
    match=r"another config \(optimizer.learning_rate: 0.001 -> "
    r"0.002\); resume it with its own values",
  ):
    train(
      tiny_config(tiny_world, tiny_dataset, sample_every=3, **{"optimizer.learning_rate": 2e-3}),
      str(run),
    )

  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')  # the process died mid-line
  for item in (run / "checkpoints" / "4" / "params").iterdir():
    if item.is_dir():
      shutil.rmtree(item)
  config_before = (run / "config.json").read_text()
  extended = tiny_config(tiny_world, tiny_dataset, sample_every=3, num_steps=8)
  with pytest.raises(
    CheckpointError,
    match=r"cannot restore step 4 .*to resume from step 2 "
    r"before it, move .*checkpoints/4 out of",
  ):
    train(extended, str(run))
  assert (run / "config.json").read_text() == config_before

  shutil.move(run / "checkpoints" / "4", tmp_path / "4.corrupt")
  capsys.readouterr()
  assert train(extended, str(run))["step"] == 8
  assert f"warning: {run / 'metrics.jsonl'}: dropped its last line" in capsys.readouterr().err
  assert [m["step"] for m in _metrics(run)] == list(range(1, 9))
  assert json.loads((run / "config.json").read_text())["num_steps"] == 8


def test_runs_join_through_jax_cluster_detection(monkeypatch):
  """With no coordinator configured the run asks JAX's own detection (initialize() with no
  arguments: Cloud TPU metadata, GKE, SLURM, Open MPI); it used to join only where
  TPU_WORKER_HOSTNAMES held a comma. No cluster found: one process; any other failure raises."""
  from ipadapter_jax.train import loop

  calls, answer = [], []

  def initialize(*args):
    calls.append(args)
    if answer:
      raise answer[0]

  monkeypatch.setattr(loop.jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(loop.jax.distributed, "initialize", initialize)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  mesh = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
  loop.initialize_distributed(mesh)
  assert calls == [()]
  answer.append(ValueError("coordinator_address should be defined."))  # JAX: no cluster here
  loop.initialize_distributed(mesh)
  answer[0] = ValueError("the slice's metadata is unreadable")
  with pytest.raises(ValueError, match="metadata"):
    loop.initialize_distributed(mesh)
  calls.clear(), answer.clear()
  loop.initialize_distributed(
    ml_collections.ConfigDict(dict(coordinator_address="host:1234", num_processes=2, process_id=1))
  )
  assert calls == [("host:1234", 2, 1)]


def test_loop_settings_are_refused_before_anything_loads(tmp_path):
  """keep_last=0 would let Orbax delete every checkpoint, log_every=0 / checkpoint_every=0
  divide by zero after the models compile, num_steps=0 exported an untrained adapter."""
  for key in ("keep_last", "log_every", "checkpoint_every", "num_steps"):
    config = tiny_config(tmp_path / "no-world", "no-data", **{key: 0})
    with pytest.raises(TrainingError, match=rf"^{key} must be >= 1, got 0$"):
      train(config, str(tmp_path / key))
    assert not (tmp_path / key).exists()


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(
  tiny_world, tiny_dataset, tmp_path, monkeypatch
):
  import jax

  from ipadapter_jax.data import batches

  original = batches.make_train_iterator

  def poisoned(*args, **kwargs):
    iterator = original(*args, **kwargs)
    real_next = type(iterator).__next__

    class Poisoned(type(iterator)):
      def __next__(self):
        batch = real_next(self)
        if self.step == 4:  # the 4th batch: after the checkpoint of step 2... and 3
          with jax.transfer_guard("allow"):  # the loop forbids hidden transfers; this one is ours
            batch = dict(batch, pixels=batch["pixels"] * np.nan)
        return batch

    iterator.__class__ = Poisoned
    return iterator

  monkeypatch.setattr(batches, "make_train_iterator", poisoned)
  workdir = str(tmp_path / "run")
  with pytest.raises(
    TrainingError,
    match=r"non-finite loss \(nan\) at step 4.*last checkpoint "
    r"\(step 2\) is intact",
  ):
    train(tiny_config(tiny_world, tiny_dataset), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert [m["step"] for m in _metrics(workdir)] == [1, 2, 3]


def test_checkpoint_holds_only_trainable_state(tiny_world, tiny_dataset, tmp_path):
  import orbax.checkpoint as ocp
  from flax import nnx

  from ipadapter_jax.models import AdapterParam
  from ipadapter_jax.train.loading import load_models

  config = tiny_config(
    tiny_world,
    tiny_dataset,
    num_steps=2,
    sample_every=2,
    sample_images=(str(tiny_world / "prompt.png"),),
    sample_steps=2,
  )
  workdir = str(tmp_path / "run")
  train(config, workdir)
  assert os.listdir(os.path.join(workdir, "samples")) == ["step_0000002.png"]  # 1 image x 2 prompts
  adapter = sum(
    int(np.prod(v.shape))
    for _, v in nnx.to_flat_state(nnx.state(load_models(config).unet, AdapterParam))
  )
  step = os.path.join(workdir, "checkpoints", "2")
  count = lambda item: sum(
    int(np.prod(m.shape))
    for m in ocp.StandardCheckpointer()
    .metadata(os.path.join(step, item))
    .item_metadata.tree.values()
  )
  assert count("params") == adapter
  assert 2 * adapter <= count("state") <= 2 * adapter + 16  # Adam's two moments and counters
  # and the convert CLI reads the run
  from ipadapter_jax.cli import convert

  out = str(tmp_path / "exported.safetensors")
  assert convert.main(["to-official", workdir, "--out", out, "--dtype", "float32"]) == 0
  from ipadapter_jax.weights import read_ip_adapter

  np.testing.assert_array_equal(
    read_ip_adapter(out)["ip_adapter.1.to_k_ip.weight"],
    read_ip_adapter(os.path.join(workdir, "ip_adapter.safetensors"))["ip_adapter.1.to_k_ip.weight"],
  )


def test_loss_falls(tiny_world, tiny_dataset, tmp_path):
  config = tiny_config(
    tiny_world,
    tiny_dataset,
    num_steps=60,
    checkpoint_every=1000,
    log_every=1,
    **{"model.trainable": "unet"},
  )
  config.optimizer.learning_rate = 2e-3
  # Clipped: unclipped at this rate a gradient spike (norms up to 10) could undo half the
  # progress, so that a change in the last bit of one gradient decided the test.
  config.optimizer.grad_clip = 1.0
  train(config, str(tmp_path / "run"))
  losses = [m["loss"] for m in _metrics(str(tmp_path / "run"))]
  first, last = np.mean(losses[:15]), np.mean(losses[-15:])
  print(f"loss: first 15 steps {first:.4f}, last 15 steps {last:.4f}")
  assert last < 0.7 * first


def test_bad_config_is_reported(tiny_world, tiny_dataset, tmp_path):
  import jax

  from ipadapter_jax.train.checks import validate

  eight = jax.sharding.AbstractMesh((4, 2), ("data", "fsdp"))
  with pytest.raises(TrainingError, match=r"batch_size 12 is not divisible by the 8 devices"):
    validate(tiny_config(tiny_world, tiny_dataset, batch_size=12), eight)
  with pytest.raises(TrainingError, match=r"mesh: data=2 x fsdp=1 does not use the 1 devices"):
    train(tiny_config(tiny_world, tiny_dataset, **{"mesh.data": 2}), str(tmp_path))
  with pytest.raises(
    TrainingError, match="model.init_adapter: /nope is neither a file nor a hub file id"
  ):
    train(tiny_config(tiny_world, tiny_dataset, **{"model.init_adapter": "/nope"}), str(tmp_path))
  one = jax.sharding.AbstractMesh((1, 1), ("data", "fsdp"))
  official = str(tiny_world / "adapter" / "ip-adapter.safetensors")
  for overrides, message in (
    ({"model.trainable": "unet"}, r"model.init_adapter is set, but model.trainable='unet'"),
    (
      {"model.adapter.attention": "simple", "export_adapter": False},
      r"official files hold decoupled adapters; model.adapter.attention='simple'",
    ),
    ({"data.data_dir": "gs://bucket/tfds"}, r"data.data_dir: gs://bucket/tfds is remote"),
    ({"model.pretrained": "gs://bucket/sd"}, r"model.pretrained: gs://bucket/sd is remote"),
  ):
    with pytest.raises(TrainingError, match=message):
      validate(
        tiny_config(tiny_world, tiny_dataset, **{"model.init_adapter": official, **overrides}), one
      )
  for overrides, message in (
    ({"eval_every": 5}, r"eval_every=5 needs eval_annotations"),
    (
      {"eval_every": 5, "eval_annotations": "/nope.json", "eval_clip": "clip"},
      r"eval_annotations: /nope.json does not exist",
    ),
    (
      {"eval_every": 5, "eval_annotations": official, "eval_clip": "clip", "eval_steps": 0},
      r"eval_limit, eval_steps and eval_batch_size must be >= 1",
    ),
    ({"eval_every": 5, "model.trainable": "clip"}, r"the clip stage generates no images"),
    ({"eval_every": 5, "model.trainable": "vae"}, r"the vae stage generates no images"),
  ):
    with pytest.raises(TrainingError, match=message):
      validate(tiny_config(tiny_world, tiny_dataset, **overrides), one)
  with pytest.raises(TrainingError, match=r"has num_tokens=4, the config asks for 8"):
    train(
      tiny_config(
        tiny_world, tiny_dataset, **{"model.init_adapter": official, "model.adapter.num_tokens": 8}
      ),
      str(tmp_path / "tokens"),
    )


def test_sharded_step_equals_single_device(tiny_world, tmp_path):
  """data=4 x fsdp=2 with the trainable weights split over fsdp: the same gradients as one
  device (an average over devices computed as a sum would be 8x off)."""
  config = tiny_config(tiny_world, "unused")
  (tmp_path / "config.json").write_text(config.to_json())
  rng = np.random.default_rng(0)
  np.savez(
    tmp_path / "batch.npz",
    pixels=rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
    clip_pixels=rng.standard_normal((8, 30, 30, 3)).astype(np.float32),
    input_ids=rng.integers(0, 100, (8, 16)).astype(np.int32),
  )
  subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "tests", "scripts", "sharded_step.py"),
      str(tmp_path / "config.json"),
      str(tmp_path / "batch.npz"),
      str(tmp_path / "out.json"),
    ],
    check=True,
    cwd=ROOT,
    capture_output=True,
  )
  out = json.loads((tmp_path / "out.json").read_text())
  sharded, single = out["sharded"], out["single"]
  assert sharded["split"], "no trainable weight was split over fsdp"
  assert not single["split"]
  assert sharded["grads"].keys() == single["grads"].keys()
  scale = max(np.abs(np.asarray(g)).max() for g in single["grads"].values())
  grad_err = max(
    np.abs(np.asarray(sharded["grads"][k]) - np.asarray(g)).max()
    for k, g in single["grads"].items()
  )
  param_err = max(
    np.abs(np.asarray(sharded["params"][k]) - np.asarray(p)).max()
    for k, p in single["params"].items()
  )
  print(
    f"data=4 x fsdp=2 ({len(sharded['split'])} weights split) vs one device: loss "
    f"{sharded['loss']:.7f} vs {single['loss']:.7f}, gradient max abs difference "
    f"{grad_err:.1e} (largest gradient {scale:.1e}), SGD update {param_err:.1e}"
  )
  assert abs(sharded["loss"] - single["loss"]) <= 1e-6 * max(1.0, abs(single["loss"]))
  assert abs(sharded["grad_norm"] - single["grad_norm"]) <= 1e-5 * single["grad_norm"]
  assert grad_err <= 1e-5 * scale
  assert param_err <= 1e-5 * config.optimizer.learning_rate * scale + 1e-7


def _start_processes(config_path, workdir, count, devices, **env):
  """`count` processes of tests/scripts/multiprocess_train.py over one localhost coordinator."""
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = os.path.join(ROOT, "tests", "scripts", "multiprocess_train.py")
  return [
    subprocess.Popen(
      [
        sys.executable,
        script,
        str(config_path),
        str(workdir),
        str(count),
        str(i),
        str(port),
        str(devices),
      ],
      cwd=ROOT,
      env={**os.environ, **env},
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
    )
    for i in range(count)
  ]


def _finish(workers, timeout=300):
  """(exit code, stderr) of each process."""
  results = []
  for worker in workers:
    _, err = worker.communicate(timeout=timeout)
    results.append((worker.returncode, err.decode()))
  return results


def test_two_processes_train_like_one_and_stop_together(tiny_world, tiny_dataset, tmp_path):
  """jax.distributed over localhost: 2 processes x 2 CPU devices == 1 process x 4 devices. Then
  SIGTERM to ONE of the two processes mid-run (a preemption notice reaches one host of a slice):
  both stop after the same step within a bounded time, both have saved that step, both exit with
  143, and running the same command again logs every step's loss as the uninterrupted run did."""
  steps = 12
  config = tiny_config(tiny_world, tiny_dataset, num_steps=steps, checkpoint_every=100)
  config_path = tmp_path / "config.json"
  config_path.write_text(config.to_json())
  shared = tmp_path / "two"
  for code, err in _finish(_start_processes(config_path, shared, 2, 2)):
    assert code == 0, err[-2000:]
  for code, err in _finish(_start_processes(config_path, tmp_path / "one", 1, 4)):
    assert code == 0, err[-2000:]
  two, one = _metrics(shared), _metrics(str(tmp_path / "one"))
  print("losses, 2 processes:", [m["loss"] for m in two], "1 process:", [m["loss"] for m in one])
  assert [m["step"] for m in two] == list(range(1, steps + 1))
  np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-5)

  run = tmp_path / "preempted"
  workers = _start_processes(config_path, run, 2, 2, STEP_DELAY="0.3")
  logged = run / "metrics.jsonl"
  _wait_for(
    lambda: logged.exists() and logged.read_text().count("\n") >= 3, workers[0], timeout=300
  )
  workers[1].send_signal(signal.SIGTERM)
  signalled = time.time()
  results = _finish(workers, timeout=120)
  elapsed = time.time() - signalled
  stopped = [re.search(r"stopped by SIGTERM after step (\d+)", err) for _, err in results]
  assert all(stopped), [err[-2000:] for _, err in results]
  at = {int(m.group(1)) for m in stopped}
  print(
    f"both processes stopped after step {at} and exited {[c for c, _ in results]} "
    f"{elapsed:.1f} s after the signal"
  )
  assert [code for code, _ in results] == [143, 143]
  assert len(at) == 1 and (stop := at.pop()) < steps
  assert elapsed < 60
  assert os.listdir(run / "checkpoints") == [str(stop)]
  assert _metrics(run)[-1]["step"] == stop
  for code, err in _finish(_start_processes(config_path, run, 2, 2)):
    assert code == 0, err[-2000:]
  timing = lambda rows: [{k: v for k, v in r.items() if k != "examples_per_second"} for r in rows]
  assert timing(_metrics(run)) == timing(two)  # every step's loss, to the last digit


def test_training_on_an_embedding_cache(tiny_world, tiny_dataset, tmp_path):
  from ipadapter_jax.data.cache import build_embedding_cache
  from ipadapter_jax.data.input_pipeline import DataSpec, open_source
  from ipadapter_jax.train.loading import load_models

  config = tiny_config(tiny_world, tiny_dataset, num_steps=3, checkpoint_every=100)
  models = load_models(config)
  cache = str(tmp_path / "cache")
  build_embedding_cache(
    open_source(tiny_dataset),
    DataSpec(resolution=32, random_crop=False, clip=None, tokenizer=None),
    models,
    cache,
    batch_size=8,
  )
  summary = train(
    tiny_config(
      tiny_world,
      cache,
      num_steps=3,
      checkpoint_every=100,
    ),
    str(tmp_path / "run"),
  )
  assert summary["step"] == 3 and np.isfinite(summary["loss"])
  assert [m["step"] for m in _metrics(str(tmp_path / "run"))] == [1, 2, 3]


def test_vae_stage_trains_and_exports_a_diffusers_folder(tiny_world, tiny_dataset, tmp_path):
  """trainable=vae: the reconstruction loss falls, only the VAE is checkpointed, and the export
  is a folder diffusers loads whose reconstructions equal ours."""
  import jax.numpy as jnp
  import torch
  from diffusers import AutoencoderKL

  from ipadapter_jax.weights.diffusers import load_vae

  config = tiny_config(
    tiny_world,
    tiny_dataset,
    num_steps=40,
    checkpoint_every=1000,
    **{
      "model.trainable": "vae",
      "model.pretrained": str(tiny_world / "sd" / "vae"),
      "model.image_encoder": "",
    },
  )
  config.optimizer.learning_rate = 2e-3
  summary = train(config, str(tmp_path / "run"))
  losses = [m["loss"] for m in _metrics(str(tmp_path / "run"))]
  first, last = np.mean(losses[:10]), np.mean(losses[-10:])
  print(f"vae loss: first 10 steps {first:.4f}, last 10 steps {last:.4f}")
  assert last < 0.7 * first
  assert summary["exported"] == [str(tmp_path / "run" / "vae")]
  ours = load_vae(str(tmp_path / "run" / "vae"))
  theirs = AutoencoderKL.from_pretrained(str(tmp_path / "run" / "vae")).eval()
  pixels = np.random.default_rng(1).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  mean, _ = ours.encode(jnp.asarray(pixels))
  got = np.asarray(ours.decode(mean))
  with torch.no_grad():
    z = theirs.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).latent_dist.mean
    expected = theirs.decode(z).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))
  untrained = load_vae(str(tiny_world / "sd" / "vae"))
  assert not np.allclose(np.asarray(untrained.decode(mean)), got)  # the weights did move
