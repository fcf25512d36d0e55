"""What a training run tells about itself: the startup lines, the profiler window, the persistent
compilation cache, throughput and utilisation on every log line, the progress bar's count of
completed steps, and the sample grids' held-out image prompts."""

import glob
import json
import os
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from ipadapter_jax.train import compilation, loop, profiling, startup, throughput
from ipadapter_jax.train.checks import TrainingError, validate, validate_loop
from ipadapter_jax.train.compile_only import MOSAIC_CALL
from ipadapter_jax.train.outputs import SampleGrids
from ipadapter_jax.train.profiling import ProfileWindow, parse_steps
from ipadapter_jax.train.sharding import make_mesh
from tests.test_train import tiny_config


def test_a_tiny_run_reports_itself_and_traces_its_window(
  tiny_world, tiny_dataset, tmp_path, capsys
):
  """One 3-step run on the CPU: the startup lines (devices, mesh, batch, the adapter's parameter
  count, the start, the compile and its cache, the FLOPs with no utilisation on a CPU), examples/s
  on every metrics line, and a trace of steps 2-3 that holds the step's executions."""
  workdir = tmp_path / "run"
  config = tiny_config(
    tiny_world, tiny_dataset, num_steps=3, checkpoint_every=100, profile_steps="2:3"
  )
  loop.train(config, str(workdir))
  err = capsys.readouterr().err
  n = jax.device_count()
  assert f"devices: {n} x cpu (cpu), {n} on this process" in err
  assert f"mesh: data={n} x fsdp=1" in err
  assert f"batch: 8 global, {8 // n} per device" in err
  adapter = load_file(str(workdir / "ip_adapter.safetensors"))  # every trainable weight
  values = sum(x.size for x in adapter.values())
  assert f"parameters: {startup.count(values)} trainable ({startup.size(4 * values)}), " in err
  assert "start: from scratch, 3 steps" in err
  assert f"profile: steps 2 to 3 traced into {workdir / 'profile'}" in err
  cache = re.escape(jax.config.jax_compilation_cache_dir)
  assert re.search(
    r"step: traced and lowered in [\d.]+ s, (compiled in [\d.]+ s \(not in the "
    rf"compilation cache; .*{cache}\)|loaded from the compilation cache in [\d.]+ "
    rf"s \({cache}\))",
    err,
  )
  assert re.search(
    r"step cost: [\d.e+]+ GFLOP per device \(XLA's count\); no utilisation: no "
    r"peak known for 'cpu'",
    err,
  )
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [1, 2, 3]
  assert all(line["examples_per_second"] > 0 and "utilisation" not in line for line in lines)
  traces = glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1
  with open(traces[0], "rb") as f:
    assert b"train_step" in f.read()  # the step ran inside the trace


def test_the_profile_window_is_checked_before_anything_loads(tmp_path):
  assert parse_steps("") is None and parse_steps("4:4") == (4, 4) and parse_steps("2:9") == (2, 9)
  for bad in ("3", "0:2", "5:4", "a:b", "2:3:4"):
    with pytest.raises(
      TrainingError,
      match=r"^profile_steps must be 'FIRST:LAST' \(steps, 1 <= "
      rf"FIRST <= LAST\) or empty, got '{bad}'$",
    ):
      validate_loop(tiny_config(tmp_path, "unused", profile_steps=bad))


def test_the_window_starts_stops_and_uploads_once(monkeypatch):
  """A run resumed at step 4 inside a 3:6 window traces steps 5-6 only; the trace of a remote
  workdir is written locally, then uploaded under workdir/profile with its layout."""
  calls, uploads = [], {}

  def start_trace(folder):
    calls.append("start")
    os.makedirs(os.path.join(folder, "plugins", "profile", "s1"))
    with open(os.path.join(folder, "plugins", "profile", "s1", "h.xplane.pb"), "wb") as f:
      f.write(b"trace")

  monkeypatch.setattr(profiling.jax.profiler, "start_trace", start_trace)
  monkeypatch.setattr(profiling.jax.profiler, "stop_trace", lambda: calls.append("stop"))
  monkeypatch.setattr(profiling.storage, "write_bytes", uploads.__setitem__)
  window = ProfileWindow("3:6", "gs://bucket/run")
  assert window.describe(4) == "profile: steps 5 to 6 traced into gs://bucket/run/profile"
  assert window.describe(6) == "profile: steps 3 to 6 ran before step 6: no trace"
  for step in (5, 6, 7):
    window.before(step)
    if window.ends_with(step):
      window.close()
    assert calls == (["start"] if step == 5 else ["start", "stop"])
  window.close()
  assert calls == ["start", "stop"]
  assert uploads == {"gs://bucket/run/profile/plugins/profile/s1/h.xplane.pb": b"trace"}
  assert ProfileWindow("", "/run").describe(0) is None


def test_the_cache_folder_follows_jax_then_the_config():
  assert compilation.cache_directory("~/c/jax", None) == os.path.expanduser("~/c/jax")
  assert compilation.cache_directory("", None) is None
  assert compilation.cache_directory("~/c/jax", "/set/by/jax") == "/set/by/jax"
  assert compilation.cache_directory("", "/set/by/jax") == "/set/by/jax"


def test_the_cache_is_turned_on_and_a_second_compile_reads_it(tmp_path):
  """With no JAX setting the config's folder is used; a program compiled twice (by two separate
  jits, so no in-memory cache answers) comes from the persistent cache the second time."""
  config = jax.config
  kept = (config.jax_compilation_cache_dir, config.jax_persistent_cache_min_compile_time_secs)
  try:
    config.update("jax_compilation_cache_dir", None)
    assert compilation.use_persistent_cache("") is None
    assert config.jax_compilation_cache_dir is None
    assert compilation.use_persistent_cache(str(tmp_path)) == str(tmp_path)
    assert config.jax_compilation_cache_dir == str(tmp_path)
    assert config.jax_persistent_cache_min_compile_time_secs == compilation.MIN_COMPILE_SECONDS
  finally:
    config.update("jax_compilation_cache_dir", kept[0])
  # The cache this process already uses (JAX reads the folder once), written even when fast.
  config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    x = jax.ShapeDtypeStruct((3, 1 + int.from_bytes(os.urandom(2), "little") % 500), jnp.float32)
    program = lambda: jax.jit(lambda a: jnp.tanh(a) * 3)  # a shape no other run compiled
    first = compilation.compile_timed(program(), x)
    second = compilation.compile_timed(program(), x)
  finally:
    config.update("jax_persistent_cache_min_compile_time_secs", kept[1])
  if kept[0]:
    assert (first.source, second.source) == ("compiled", "cache")
  else:
    assert (first.source, second.source) == ("uncached", "uncached")
  assert second.executable(jnp.ones(x.shape)).shape == x.shape


def test_throughput_and_utilisation_of_an_interval(monkeypatch):
  """4 steps of 8 examples in 2 s of training (plus 1 s of sample grids, left out): 16
  examples/s, and 2 steps/s x 2 TFLOP over a 100 TFLOP/s peak is 4%. With no peak, no key."""
  clock = iter([10.0, 13.0, 14.0, 15.0, 16.0])
  monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
  cost = throughput.StepCost(flops=2e12, peak_flops=1e14)
  outputs = loop.StepOutputs(batch_size=8, lr_schedule=lambda step: 0.1, cost=cost)
  out = {"loss": jnp.float32(1), "grad_norm": jnp.float32(1), "param_norm": jnp.float32(1)}
  for step in range(1, 5):
    outputs.add(step, out)
  outputs.exclude(1.0)
  first = outputs.summary(last_checkpoint=None)
  assert first["examples_per_second"] == pytest.approx(16.0)
  assert first["utilisation"] == pytest.approx(0.04)
  outputs.add(5, out)  # the next interval starts clean: 1 step in 1 s
  assert outputs.summary(last_checkpoint=None)["utilisation"] == pytest.approx(0.02)
  unknown = loop.StepOutputs(8, lambda step: 0.1, throughput.StepCost(flops=2e12, peak_flops=None))
  unknown.add(1, out)
  assert "utilisation" not in unknown.summary(last_checkpoint=None)


class _Compiled:
  def __init__(self, flops, text=""):
    self.flops, self.text = flops, text

  def cost_analysis(self):
    return {"flops": self.flops}

  def as_text(self):
    return self.text


def test_step_cost_adds_kernel_attention_and_knows_its_chip():
  plain = throughput.step_cost(_Compiled(5e12), "TPU v5 lite")
  assert (plain.flops, plain.peak_flops, plain.lower_bound) == (5e12, 197e12, False)
  kernels = throughput.step_cost(
    _Compiled(5e12, f"x {MOSAIC_CALL} y"), "TPU v5 lite", kernel_attention_flops=lambda: 1e12
  )
  assert (kernels.flops, kernels.kernel_flops, kernels.lower_bound) == (8e12, 3e12, False)
  assert throughput.step_cost(_Compiled(5e12, MOSAIC_CALL), "TPU v4").lower_bound
  assert throughput.step_cost(
    _Compiled(5e12, 'target="__cudnn$fmhaSoftmax"'), "NVIDIA H100 80GB HBM3"
  ).lower_bound
  cpu = throughput.step_cost(_Compiled(5e12), "cpu")
  assert cpu.peak_flops is None and cpu.utilisation(10.0) is None
  x, w = jax.ShapeDtypeStruct((16, 32), jnp.float32), jax.ShapeDtypeStruct((32, 8), jnp.float32)
  matmul = jax.jit(jnp.matmul).lower(x, w).compile()
  assert throughput.xla_flops(matmul) == 2 * 16 * 32 * 8


class _Bar:
  def __init__(self, n):
    self.n = n

  def update(self, k):
    self.n += k


class _Loss:
  def __init__(self):
    self.ready = False

  def block_until_ready(self):
    self.ready = True
    return self


def test_the_progress_bar_counts_completed_steps_one_step_behind_dispatch():
  """A step counts once its loss is ready; the newest dispatched step is not waited for (the
  devices keep one step queued) until a read-back says every step is done."""
  progress = loop.CompletedSteps(_Bar(5))  # resumed at step 5
  losses = [_Loss() for _ in range(3)]
  progress.dispatched(6, losses[0])
  assert progress.bar.n == 5 and not losses[0].ready
  progress.dispatched(7, losses[1])
  assert progress.bar.n == 6 and losses[0].ready and not losses[1].ready
  progress.dispatched(8, losses[2])
  assert progress.bar.n == 7 and not losses[2].ready
  progress.reached(8)
  progress.reached(7)  # never backwards
  assert progress.bar.n == 8


class _StubPipe:
  def __init__(self, adapter):
    self.models = SimpleNamespace(unet=SimpleNamespace(image_proj=object() if adapter else None))


def test_sample_grids_take_held_out_prompt_images(tmp_path):
  """With no sample_images an adapter run's rows are the first images of eval_annotations; with
  neither, a warning says the grids show no image prompt; a base run needs none."""
  records = []
  for i, red in enumerate((10, 120, 230)):
    Image.fromarray(np.full((6, 6, 3), (red, 0, 0), np.uint8)).save(tmp_path / f"{i}.png")
    records.append({"image_file": f"{i}.png", "text": f"{i}"})
  (tmp_path / "heldout.json").write_text(json.dumps(records))
  cfg = tiny_config(
    tmp_path, "unused", sample_every=5, eval_annotations=str(tmp_path / "heldout.json")
  )
  grids = SampleGrids(cfg, _StubPipe(adapter=True), str(tmp_path), None)
  assert [np.asarray(image)[0, 0, 0] for image in grids.images] == [10, 120]
  assert grids.description.startswith("sample grids: the first 2 image prompts of eval_annotations")
  cfg.eval_annotations = ""
  grids = SampleGrids(cfg, _StubPipe(adapter=True), str(tmp_path), None)
  assert grids.images == [] and grids.description.startswith(
    "warning: the sample grids show no image prompt"
  )
  assert SampleGrids(cfg, _StubPipe(adapter=False), str(tmp_path), None).description is None
  cfg.eval_annotations = str(tmp_path / "missing.json")
  cfg.data.source = str(tmp_path)
  with pytest.raises(
    TrainingError,
    match=r"^eval_annotations: .*missing.json does not exist "
    r"\(the sample grids take",
  ):
    validate(cfg, make_mesh(1, 1, devices=jax.devices()[:1]))
