"""`train.py`'s loop: reads top to bottom in the order a run happens."""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from ipadapter_jax import storage
from ipadapter_jax.data import batches as data_batches
from ipadapter_jax.data import input_pipeline
from ipadapter_jax.generation.pipeline import IPAdapterPipeline
from ipadapter_jax.train import sharding
from ipadapter_jax.train.checkpoint import Checkpoints
from ipadapter_jax.train.checks import TrainingError, check_resume, validate, validate_loop
from ipadapter_jax.train.compilation import compile_timed, use_persistent_cache
from ipadapter_jax.train.loading import empty_conditions, load_models, step_spec
from ipadapter_jax.train.metrics import MetricsWriter
from ipadapter_jax.train.outputs import SampleGrids, check_export, export, write_run_files
from ipadapter_jax.train.preemption import StopSignal
from ipadapter_jax.train.profiling import ProfileWindow
from ipadapter_jax.train.program import program_from_config
from ipadapter_jax.train.startup import announce, compile_line, cost_line, setup_lines
from ipadapter_jax.train.step import make_schedule
from ipadapter_jax.train.throughput import StepCost, step_cost, unet_kernel_attention
from ipadapter_jax.train.validation import Validation


def initialize_distributed(mesh_cfg):
  """Joins a multi-process run: an explicit coordinator (GPU clusters), else JAX's own cluster
  detection (Cloud TPU VMs and GKE, SLURM, Open MPI); where it finds none, one process."""
  if jax.distributed.is_initialized():  # the caller joined already
    return
  if mesh_cfg.coordinator_address:
    jax.distributed.initialize(
      mesh_cfg.coordinator_address, mesh_cfg.num_processes, mesh_cfg.process_id
    )
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:  # JAX's word for "no cluster here": nothing named a coordinator
    if "coordinator_address" not in str(e):
      raise
  except RuntimeError as e:  # JAX already runs in this process (a notebook, a test): one process
    if "must be called before" not in str(e):
      raise


class StepOutputs:
  """The train step's outputs since the last log line, left on the devices until they are
  needed: reading a loss back every step would stall the accelerator's dispatch queue."""

  def __init__(self, batch_size: int, lr_schedule, cost: StepCost | None = None):
    self.batch_size, self.lr_schedule, self.cost = batch_size, lr_schedule, cost
    self.pending, self.values = [], []  # (step, device outputs) / (step, host outputs)
    self.tick = time.perf_counter()
    self.excluded = 0.0  # seconds of the interval spent on sample grids and validation
    self.last_loss = None

  def exclude(self, seconds: float):
    """Leaves `seconds` (work between steps that is not training) out of the throughput."""
    self.excluded += seconds

  def add(self, step: int, out: dict):
    self.pending.append((step, out))

  def check(self, last_checkpoint: int | None):
    """Reads the pending outputs back (one transfer) and stops the run at a non-finite loss,
    gradient or parameter (the step kept the state it was given)."""
    if not self.pending:
      return
    host = jax.device_get([out for _, out in self.pending])
    for (step, _), out in zip(self.pending, host):
      for name in ("loss", "grad_norm", "param_norm"):
        if not np.isfinite(out[name]):
          kept = (
            f"the last checkpoint (step {last_checkpoint}) is intact"
            if last_checkpoint
            else "no checkpoint was saved before it"
          )
          raise TrainingError(
            f"non-finite {name} ({out[name]}) at step {step}; the run stops here and {kept}"
          )
      self.values.append((step, out))
      self.last_loss = float(out["loss"])
    self.pending = []

  def summary(self, last_checkpoint: int | None) -> dict:
    """Means over the interval, its learning rate and its measured throughput (examples/s, and
    the chips' utilisation where their peak is known); starts the next. The time is that of
    completed steps: the read-back waits for the last one."""
    self.check(last_checkpoint)
    now = time.perf_counter()
    steps = [step for step, _ in self.values]
    seconds = now - self.tick - self.excluded
    with jax.transfer_guard("allow"):  # optax evaluates the schedule as a small jax computation
      learning_rate = float(self.lr_schedule(steps[-1] - 1))
    summary = {
      "loss": float(np.mean([out["loss"] for _, out in self.values])),
      "grad_norm": float(np.mean([out["grad_norm"] for _, out in self.values])),
      "learning_rate": learning_rate,
      "examples_per_second": len(steps) * self.batch_size / seconds,
    }
    utilisation = self.cost.utilisation(len(steps) / seconds) if self.cost else None
    if utilisation is not None:
      summary["utilisation"] = utilisation
    self.values, self.tick, self.excluded = [], now, 0.0
    return summary


class CompletedSteps:
  """The progress bar, counting steps whose outputs are ready: a count of dispatched steps runs
  ahead of the devices (asynchronous dispatch), then stalls at the next read-back. Each step
  waits for the one before it (`block_until_ready`: no transfer), so the host dispatches one
  step ahead of the devices and they do not wait for it."""

  def __init__(self, bar):
    self.bar = bar
    self.previous = None  # (step, a small output) of the step dispatched last

  def dispatched(self, step: int, loss):
    if self.previous is not None:
      done, ready = self.previous
      jax.block_until_ready(ready)
      self.reached(done)
    self.previous = (step, loss)

  def reached(self, step: int):
    """Every step up to `step` is complete (their outputs were read back)."""
    if step > self.bar.n:
      self.bar.update(step - self.bar.n)


def train(cfg, workdir: str) -> dict:
  """Trains (or resumes) as `cfg` says; returns a summary of the run."""
  validate_loop(cfg)
  workdir = storage.resolve(workdir, "--workdir")
  storage.check_reachable(workdir)
  cache_dir = use_persistent_cache(cfg.compilation_cache_dir)  # before anything compiles

  # ----- Mesh ------------------------------------------------------------------------------
  initialize_distributed(cfg.mesh)
  try:
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  except ValueError as e:
    raise TrainingError(str(e)) from None
  validate(cfg, mesh)

  # ----- Resume point: a run resumes only with the config it was trained with ----------------
  storage.makedirs(workdir)
  checkpoints = Checkpoints(
    storage.join(workdir, "checkpoints"), keep_last=cfg.keep_last, keep_every=cfg.keep_every
  )
  start = checkpoints.latest_step() or 0
  if start:
    check_resume(cfg, workdir)

  # ----- Data ------------------------------------------------------------------------------
  source = input_pipeline.open_source(
    cfg.data.source, split=cfg.data.split, data_dir=cfg.data.data_dir or None
  )
  cached = input_pipeline.is_cached(source)  # an embedding cache holds encoder outputs

  # ----- Models ----------------------------------------------------------------------------
  sd = load_models(cfg)
  if jax.process_index() == 0:  # where the export is written
    check_export(cfg, sd, workdir)  # a folder the export would refuse, found before training
  spec = step_spec(cfg, sd, cached=cached)
  networks = sd.networks()
  program, params, frozen = program_from_config(cfg, networks, spec, mesh)
  data_spec = input_pipeline.DataSpec(
    resolution=cfg.data.resolution,
    random_crop=cfg.data.random_crop,
    clip=sd.image_processor,
    tokenizer=sd.tokenizer,
    tokenizer_2=sd.tokenizer_2,
    image_key=cfg.data.image_key,
    caption_key=cfg.data.caption_key,
  )
  batches = data_batches.make_train_iterator(
    source,
    data_spec,
    global_batch_size=cfg.batch_size,
    mesh=mesh,
    seed=cfg.seed,
    worker_count=cfg.data.worker_count,
    max_bad_records=cfg.data.max_bad_records,
    shuffle_buffer=cfg.data.shuffle_buffer,
  )

  # ----- Train state and frozen weights: placed in their shards on the devices ---------------
  replicated = program.replicated
  state = program.init_state(params)
  frozen = program.place_frozen(frozen)
  empty = jax.device_put(empty_conditions(cfg, sd, spec), replicated)

  # ----- Restore ---------------------------------------------------------------------------
  if start:
    abstract = sharding.abstract(state, program.state_shardings)
    state, data_state = checkpoints.restore(start, abstract)
    batches.set_state(data_state)
  write_run_files(
    cfg, sd, workdir
  )  # only now: a failed restore leaves the run's files as they were
  metrics = MetricsWriter(workdir, resume_step=start)
  # Sample grids and validation share one pipeline, made on process 0 only.
  reporting = sd.unet is not None and (cfg.sample_every or cfg.eval_every)
  pipe = IPAdapterPipeline(sd) if reporting and jax.process_index() == 0 else None
  samples = SampleGrids(cfg, pipe, workdir, metrics) if pipe and cfg.sample_every else None
  validation = Validation(cfg, pipe) if pipe and cfg.eval_every else None

  profile = ProfileWindow(cfg.profile_steps, workdir)
  announce(
    setup_lines(
      cfg,
      mesh,
      params,
      frozen,
      start=start,
      notes=(getattr(samples, "description", None), profile.describe(start)),
    )
  )

  # ----- Step function, compiled ahead of the loop -----------------------------------------
  key = jax.jit(lambda: jax.random.key(cfg.seed), out_shardings=replicated)()  # on every host
  first = next(batches)
  timed = compile_timed(program.step(first), state, frozen, first, empty, key)
  compiled = timed.executable
  device_kind = mesh.devices.flat[0].device_kind
  cost = step_cost(
    compiled,
    device_kind,
    kernel_attention_flops=unet_kernel_attention(sd, first, cfg.batch_size // mesh.size),
  )
  announce([compile_line(timed, cache_dir), cost_line(cost, device_kind)])

  # ----- Loop ------------------------------------------------------------------------------
  # A signal stops the run at a step boundary, with a checkpoint of that step: one that arrives
  # while a checkpoint, sample grid or validation runs is honoured after the next step.
  stop = StopSignal()
  progress = CompletedSteps(
    tqdm(
      total=cfg.num_steps,
      initial=start,
      desc="training",
      unit="step",
      disable=jax.process_index() != 0,
    )
  )
  outputs = StepOutputs(cfg.batch_size, make_schedule(cfg.optimizer, cfg.num_steps), cost)
  step, batch = start, first
  try:
    # Hidden host transfers fail loudly; the explicit ones below (checkpoints, read-backs,
    # sample grids) are deliberate.
    with jax.transfer_guard("disallow"):
      while step < cfg.num_steps:
        profile.before(step + 1)
        state, out = compiled(state, frozen, batch, empty, key)
        step += 1
        outputs.add(step, out)
        progress.dispatched(step, out["loss"])
        if profile.ends_with(step):
          jax.block_until_ready((state, out))  # the trace holds the whole of its last step
          tracing = time.perf_counter()
          profile.close()
          outputs.exclude(time.perf_counter() - tracing)  # writing the trace is no training time
        last = step == cfg.num_steps
        stopping = stop.reached(step)  # on every host, at every step
        if step % cfg.log_every == 0 or last or stopping:
          values = outputs.summary(checkpoints.latest_step())
          progress.reached(step)
          values["skipped_records"] = batches.skipped_records  # undecodable, so far (this host)
          metrics.write(step, values)
          progress.bar.set_postfix(_postfix(values))
        if step % cfg.checkpoint_every == 0 or last or stopping:
          outputs.check(checkpoints.latest_step())  # a non-finite state is never saved
          progress.reached(step)
          with jax.transfer_guard("allow"):
            checkpoints.save(step, state, batches.get_state(), force=True)
        if stopping and not last:
          break
        sample_now = reporting and _due(step, cfg.sample_every, last)
        eval_now = reporting and _due(step, cfg.eval_every, last)
        if sample_now or eval_now:
          outputs.check(checkpoints.latest_step())
          progress.reached(step)
          reporting_since = time.perf_counter()
          with jax.transfer_guard("allow"):
            weights = _gather(_exported(state))  # every process joins the gather
            if samples is not None and sample_now:
              samples(step, weights)
            if validation is not None and eval_now:
              metrics.write(step, validation(weights))
          outputs.exclude(time.perf_counter() - reporting_since)  # the devices had no step
        if not last:
          batch = next(batches)
    outputs.check(checkpoints.latest_step())
    progress.reached(step)
  finally:
    profile.close()
    stop.close()
    checkpoints.wait()
    checkpoints.close()
    metrics.close()
    progress.bar.close()

  # ----- Export ----------------------------------------------------------------------------
  summary = {
    "step": step,
    "loss": outputs.last_loss,
    "stopped_by_signal": step < cfg.num_steps and stop.signum is not None,
  }
  if summary["stopped_by_signal"]:
    summary["signal"] = stop.name
    print(
      f"stopped by {stop.name} after step {step}: checkpoint {step} is saved; run the same "
      "command again to resume",
      file=sys.stderr,
      flush=True,
    )
  else:
    nnx.update(networks, _gather(_exported(state)))
    if jax.process_index() == 0:
      summary["exported"] = export(cfg, sd, workdir)
  return summary


def _postfix(values: dict) -> dict:
  """The progress bar's view of a log line."""
  shown = {"loss": f"{values['loss']:.4f}", "ex/s": f"{values['examples_per_second']:.3g}"}
  if "utilisation" in values:
    shown["util"] = f"{values['utilisation']:.1%}"
  return shown


def _due(step: int, every: int, last: bool) -> bool:
  return bool(every) and (step % every == 0 or last)


def _exported(state):
  """The weights a run exports, samples and validates: the EMA when there is one."""
  return state.ema if state.ema is not None else state.params


def _gather(tree):
  """Global arrays as numpy arrays on every process (gathered across hosts if needed)."""

  def one(x):
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)
