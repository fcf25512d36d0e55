"""`train.py`'s loop: reads top to bottom in the order a run happens."""

from __future__ import annotations

import json
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from ipadapter_jax import storage
from ipadapter_jax.data import input_pipeline
from ipadapter_jax.generation.pipeline import IPAdapterPipeline
from ipadapter_jax.train import sharding
from ipadapter_jax.train.checks import TrainingError, check_resume, validate, validate_loop
from ipadapter_jax.train.checkpoint import Checkpoints
from ipadapter_jax.train.metrics import MetricsWriter
from ipadapter_jax.train.loading import empty_conditions, load_models, step_spec
from ipadapter_jax.train.outputs import SampleGrids, check_export, export, write_run_files
from ipadapter_jax.train.preemption import StopSignal, exit_code
from ipadapter_jax.train.validation import Validation
from ipadapter_jax.train.program import program_from_config
from ipadapter_jax.train.step import make_schedule
from ipadapter_jax.weights.files import CheckpointError


def initialize_distributed(mesh_cfg):
  """Joins a multi-process run: an explicit coordinator (GPU clusters), else JAX's own cluster
  detection (Cloud TPU VMs and GKE, SLURM, Open MPI); where it finds none, one process."""
  if jax.distributed.is_initialized():  # the caller joined already
    return
  if mesh_cfg.coordinator_address:
    jax.distributed.initialize(mesh_cfg.coordinator_address, mesh_cfg.num_processes,
                               mesh_cfg.process_id)
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

  def __init__(self, batch_size: int, lr_schedule):
    self.batch_size, self.lr_schedule = batch_size, lr_schedule
    self.pending, self.values = [], []  # (step, device outputs) / (step, host outputs)
    self.tick = time.perf_counter()
    self.last_loss = None

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
          kept = (f"the last checkpoint (step {last_checkpoint}) is intact" if last_checkpoint
                  else "no checkpoint was saved before it")
          raise TrainingError(f"non-finite {name} ({out[name]}) at step {step}; the run stops "
                              f"here and {kept}")
      self.values.append((step, out))
      self.last_loss = float(out["loss"])
    self.pending = []

  def summary(self, last_checkpoint: int | None) -> dict:
    """Means over the interval, its learning rate and its measured throughput; starts the next."""
    self.check(last_checkpoint)
    now = time.perf_counter()
    steps = [step for step, _ in self.values]
    with jax.transfer_guard("allow"):  # optax evaluates the schedule as a small jax computation
      learning_rate = float(self.lr_schedule(steps[-1] - 1))
    summary = {"loss": float(np.mean([out["loss"] for _, out in self.values])),
               "grad_norm": float(np.mean([out["grad_norm"] for _, out in self.values])),
               "learning_rate": learning_rate,
               "examples_per_second": len(steps) * self.batch_size / (now - self.tick)}
    self.values, self.tick = [], now
    return summary


def train(cfg, workdir: str) -> dict:
  """Trains (or resumes) as `cfg` says; returns a summary of the run."""
  validate_loop(cfg)
  workdir = storage.resolve(workdir, "--workdir")
  storage.check_reachable(workdir)

  # ----- Mesh ------------------------------------------------------------------------------
  initialize_distributed(cfg.mesh)
  try:
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  except ValueError as e:
    raise TrainingError(str(e)) from None
  validate(cfg, mesh)

  # ----- Resume point: a run resumes only with the config it was trained with ----------------
  storage.makedirs(workdir)
  checkpoints = Checkpoints(storage.join(workdir, "checkpoints"), keep_last=cfg.keep_last,
                            keep_every=cfg.keep_every)
  start = checkpoints.latest_step() or 0
  if start:
    check_resume(cfg, workdir)

  # ----- Data ------------------------------------------------------------------------------
  source = input_pipeline.open_source(cfg.data.source, split=cfg.data.split,
                                      data_dir=cfg.data.data_dir or None)
  cached = input_pipeline.is_cached(source)  # an embedding cache holds encoder outputs

  # ----- Models ----------------------------------------------------------------------------
  sd = load_models(cfg)
  if jax.process_index() == 0:  # where the export is written
    check_export(cfg, sd, workdir)  # a folder the export would refuse, found before training
  spec = step_spec(cfg, sd, cached=cached)
  networks = sd.networks()
  program, params, frozen = program_from_config(cfg, networks, spec, mesh)
  data_spec = input_pipeline.DataSpec(
      resolution=cfg.data.resolution, random_crop=cfg.data.random_crop, clip=sd.image_processor,
      tokenizer=sd.tokenizer, tokenizer_2=sd.tokenizer_2, image_key=cfg.data.image_key,
      caption_key=cfg.data.caption_key)
  batches = input_pipeline.make_train_iterator(
      source, data_spec, global_batch_size=cfg.batch_size, mesh=mesh, seed=cfg.seed,
      worker_count=cfg.data.worker_count, max_bad_records=cfg.data.max_bad_records)

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
  write_run_files(cfg, sd, workdir)  # only now: a failed restore leaves the run's files as they were
  metrics = MetricsWriter(workdir, resume_step=start)
  # Sample grids and validation share one pipeline, made on process 0 only.
  reporting = sd.unet is not None and (cfg.sample_every or cfg.eval_every)
  pipe = IPAdapterPipeline(sd) if reporting and jax.process_index() == 0 else None
  samples = SampleGrids(cfg, pipe, workdir, metrics) if pipe and cfg.sample_every else None
  validation = Validation(cfg, pipe) if pipe and cfg.eval_every else None

  # ----- Step function, compiled ahead of the loop -----------------------------------------
  key = jax.jit(lambda: jax.random.key(cfg.seed), out_shardings=replicated)()  # on every host
  first = next(batches)
  compiled = program.step(first).lower(state, frozen, first, empty, key).compile()

  # ----- Loop ------------------------------------------------------------------------------
  # A signal stops the run at a step boundary, with a checkpoint of that step: one that arrives
  # while a checkpoint, sample grid or validation runs is honoured after the next step.
  stop = StopSignal()
  progress = tqdm(total=cfg.num_steps, initial=start, desc="training", unit="step",
                  disable=jax.process_index() != 0)
  outputs = StepOutputs(cfg.batch_size, make_schedule(cfg.optimizer, cfg.num_steps))
  step, batch = start, first
  try:
    # Hidden host transfers fail loudly; the explicit ones below (checkpoints, read-backs,
    # sample grids) are deliberate.
    with jax.transfer_guard("disallow"):
      while step < cfg.num_steps:
        state, out = compiled(state, frozen, batch, empty, key)
        step += 1
        outputs.add(step, out)
        progress.update(1)
        last = step == cfg.num_steps
        stopping = stop.reached(step)  # on every host, at every step
        if step % cfg.log_every == 0 or last or stopping:
          values = outputs.summary(checkpoints.latest_step())
          values["skipped_records"] = batches.skipped_records  # undecodable, so far (this host)
          metrics.write(step, values)
          progress.set_postfix(loss=f"{values['loss']:.4f}")
        if step % cfg.checkpoint_every == 0 or last or stopping:
          outputs.check(checkpoints.latest_step())  # a non-finite state is never saved
          with jax.transfer_guard("allow"):
            checkpoints.save(step, state, batches.get_state(), force=True)
        if stopping and not last:
          break
        sample_now = reporting and _due(step, cfg.sample_every, last)
        eval_now = reporting and _due(step, cfg.eval_every, last)
        if sample_now or eval_now:
          outputs.check(checkpoints.latest_step())
          with jax.transfer_guard("allow"):
            weights = _gather(_exported(state))  # every process joins the gather
            if samples is not None and sample_now:
              samples(step, weights)
            if validation is not None and eval_now:
              metrics.write(step, validation(weights))
        if not last:
          batch = next(batches)
    outputs.check(checkpoints.latest_step())
  finally:
    stop.close()
    checkpoints.wait()
    checkpoints.close()
    metrics.close()
    progress.close()

  # ----- Export ----------------------------------------------------------------------------
  summary = {"step": step, "loss": outputs.last_loss,
             "stopped_by_signal": step < cfg.num_steps and stop.signum is not None}
  if summary["stopped_by_signal"]:
    summary["signal"] = stop.name
    print(f"stopped by {stop.name} after step {step}: checkpoint {step} is saved; run the same "
          "command again to resume", file=sys.stderr, flush=True)
  else:
    nnx.update(networks, _gather(_exported(state)))
    if jax.process_index() == 0:
      summary["exported"] = export(cfg, sd, workdir)
  return summary


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


def train_command(cfg, workdir: str) -> int:
  """train() for the command line: a run-ending problem is one line on stderr, exit code 1."""
  try:
    summary = train(cfg, workdir)
  except (TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(json.dumps(summary))
  if summary["stopped_by_signal"]:
    return exit_code(getattr(signal, summary["signal"]))
  return 0
