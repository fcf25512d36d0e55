"""`train.py`'s loop: reads top to bottom in the order a run happens."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.schedulers import NoiseSchedule
from ipadapter_jax.train import sharding
from ipadapter_jax.train.checkpoint import Checkpoints
from ipadapter_jax.train.metrics import MetricsWriter
from ipadapter_jax.train.step import (TRAINABLE, StepSpec, TrainState, make_optimizer,
                                      make_schedule, train_step, trainable_filter)
from ipadapter_jax.weights.files import CheckpointError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingError(RuntimeError):
  """A run that must stop: a non-finite loss, a bad configuration."""


def initialize_distributed(mesh_cfg):
  """Joins a multi-process run: explicit coordinator (GPU clusters) or Cloud TPU auto-detection."""
  if mesh_cfg.coordinator_address:
    jax.distributed.initialize(mesh_cfg.coordinator_address, mesh_cfg.num_processes,
                               mesh_cfg.process_id)
  elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()


def validate(cfg, mesh):
  """Checks the config against the mesh and the file system before any work."""
  devices = mesh.size
  if cfg.batch_size % devices:
    raise TrainingError(f"batch_size {cfg.batch_size} is not divisible by the {devices} devices "
                        f"of the mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
  if cfg.model.trainable not in TRAINABLE:
    raise TrainingError(f"model.trainable must be one of {', '.join(TRAINABLE)}, "
                        f"got {cfg.model.trainable!r}")
  for key in ("frozen_dtype", "compute_dtype"):
    if cfg.model[key] not in DTYPES:
      raise TrainingError(f"model.{key} must be one of {sorted(DTYPES)}, got {cfg.model[key]!r}")
  if cfg.model.remat not in ("none", "full", "dots"):
    raise TrainingError(f"model.remat must be none, full or dots, got {cfg.model.remat!r}")
  if not cfg.data.source:
    raise TrainingError("data.source is empty: give a built dataset folder or a TFDS name")
  for key, path in (("model.init_adapter", cfg.model.init_adapter),
                    *((f"sample_images[{i}]", p) for i, p in enumerate(cfg.sample_images))):
    if path and not os.path.exists(path):
      raise TrainingError(f"{key}: {path} does not exist")
  if cfg.model.adapter.attention != "decoupled" and cfg.export_adapter:
    raise TrainingError(f"model.adapter.attention={cfg.model.adapter.attention!r} has no official "
                        "file format: set export_adapter=False (the checkpoints keep it)")
  probabilities = (cfg.dropout.image, cfg.dropout.text, cfg.dropout.both)
  if min(probabilities) < 0 or sum(probabilities) > 1:
    raise TrainingError(f"dropout probabilities {probabilities} must be >= 0 and sum to <= 1")


def load_clip_towers(cfg):
  """The contrastive stage's models: both towers of a CLIPModel folder (`model.pretrained`), with
  its tokenizer and image settings, in a StableDiffusion bundle without UNet."""
  from ipadapter_jax.data.preprocessing import CLIPImageConfig  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.data.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.weights import StableDiffusion, load_clip_text, load_clip_vision  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.weights.folders import local_path  # pylint: disable=import-outside-toplevel
  folder = local_path(cfg.model.pretrained, allow_patterns=["*.json", "*.txt", "*.safetensors"])
  kw = dict(dtype=DTYPES[cfg.model.compute_dtype], param_dtype=DTYPES[cfg.model.frozen_dtype])
  return StableDiffusion(
      unet=None, vae=None, text_encoder=load_clip_text(folder, with_projection=True, **kw),
      tokenizer=load_tokenizer(folder), scheduler_config={},
      image_encoder=load_clip_vision(folder, **kw),
      image_processor=CLIPImageConfig.from_folder(folder))


def load_models(cfg):
  """The frozen models plus the UNet with its (trainable) adapter, as a StableDiffusion bundle."""
  from ipadapter_jax.data.preprocessing import CLIPImageConfig  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.weights import load_clip_vision, load_stable_diffusion  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.weights.folders import local_path  # pylint: disable=import-outside-toplevel
  m = cfg.model
  if m.trainable == "clip":
    return load_clip_towers(cfg)
  dtype, param_dtype = DTYPES[m.compute_dtype], DTYPES[m.frozen_dtype]
  with_adapter = m.trainable in ("adapter", "all")
  image_encoder = image_processor = adapter = None
  if with_adapter:
    if not m.image_encoder:
      raise TrainingError("training an adapter needs model.image_encoder")
    encoder_dir = local_path(m.image_encoder, allow_patterns=["*.json", "*.safetensors"])
    image_encoder = load_clip_vision(encoder_dir, dtype=dtype, param_dtype=param_dtype)
    image_processor = CLIPImageConfig.from_folder(encoder_dir)
    a = m.adapter
    embed_dim = (image_encoder.config.projection_dim if a.kind == "basic"
                 else image_encoder.config.hidden_size)
    adapter = AdapterConfig(num_tokens=a.num_tokens, embed_dim=embed_dim, kind=a.kind,
                            resampler_dim=a.resampler_dim or None, resampler_depth=a.resampler_depth,
                            resampler_heads=a.resampler_heads or None, attention=a.attention)
  sd = load_stable_diffusion(
      m.pretrained, adapter=None if m.init_adapter else adapter,
      ip_adapter=m.init_adapter or None, dtype=dtype, param_dtype=param_dtype,
      variant=m.variant or None, seed=cfg.seed,
      attention_implementation=m.attention_implementation or None)
  if m.init_adapter and (sd.unet.adapter_config.kind, sd.unet.adapter_config.num_tokens) != (
      adapter.kind, adapter.num_tokens):
    raise TrainingError(f"model.init_adapter {m.init_adapter} holds {sd.unet.adapter_config}, "
                        f"the config asks for {adapter}")
  sd.image_encoder, sd.image_processor = image_encoder, image_processor
  sd.unet.remat = m.remat
  if cfg.noise.prediction_type:  # what the model learns is what its samplers must read
    sd.scheduler_config = {**sd.scheduler_config, "prediction_type": cfg.noise.prediction_type}
  return sd


def step_spec(cfg, sd) -> StepSpec:
  if sd.unet is None:
    return StepSpec(schedule=None, image_features=None, drop_image=0.0, drop_text=0.0,
                    drop_both=0.0, cached=False, scaling_factor=None,
                    ema_decay=cfg.optimizer.ema_decay, objective="contrastive",
                    temperature=cfg.contrastive_temperature)
  overrides = {"prediction_type": cfg.noise.prediction_type} if cfg.noise.prediction_type else {}
  schedule = NoiseSchedule.from_diffusers(sd.scheduler_config, **overrides)
  features = None
  if sd.unet.adapter_config is not None:
    features = "hidden_states" if sd.unet.adapter_config.uses_hidden_states else "image_embeds"
  return StepSpec(schedule=schedule, image_features=features, drop_image=cfg.dropout.image,
                  drop_text=cfg.dropout.text, drop_both=cfg.dropout.both, cached=cfg.data.cached,
                  scaling_factor=None if sd.vae is None else sd.vae.config.scaling_factor,
                  snr_gamma=cfg.noise.snr_gamma, ema_decay=cfg.optimizer.ema_decay)


def empty_conditions(cfg, sd, spec: StepSpec) -> dict:
  """What a dropped caption / image becomes (REFERENCE §5), computed once per run."""
  from ipadapter_jax.data.tokenizer import tokenize  # pylint: disable=import-outside-toplevel
  empty = {}
  if cfg.data.cached:
    from ipadapter_jax.data.cache import load_empty_text  # pylint: disable=import-outside-toplevel
    empty.update({k: jnp.asarray(v) for k, v in load_empty_text(cfg.data.source).items()})
  else:
    empty["input_ids"] = jnp.asarray(tokenize(sd.tokenizer, [""]))
    if sd.tokenizer_2 is not None:
      empty["input_ids_2"] = jnp.asarray(tokenize(sd.tokenizer_2, [""]))
  if spec.image_features == "hidden_states" and cfg.data.cached:
    size = sd.image_encoder.config.image_size
    zeros = jnp.zeros((1, size, size, sd.image_encoder.config.num_channels))
    empty["image_hidden_states"] = sd.image_encoder(zeros).hidden_states[-2][0]
  return empty


def write_run_files(cfg, sd, workdir):
  """The resolved config, and what `convert to-official` needs to read the checkpoints."""
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  if sd.unet is not None and sd.unet.adapter_config is not None:
    with open(os.path.join(workdir, "adapter_config.json"), "w") as f:
      json.dump({"adapter": dataclasses.asdict(sd.unet.adapter_config),
                 "unet": sd.unet.config.to_diffusers()}, f, indent=2)


def export(cfg, sd, workdir):
  """The trained weights in PyTorch-world formats: the official adapter and/or a diffusers folder
  (or, for the contrastive stage, a transformers CLIPModel folder)."""
  from ipadapter_jax.weights import save_clip_model, save_ip_adapter, save_stable_diffusion  # pylint: disable=import-outside-toplevel
  if sd.unet is None:  # the contrastive stage
    path = os.path.join(workdir, "clip")
    save_clip_model(sd.text_encoder, sd.image_encoder, path, tokenizer=sd.tokenizer,
                    processor=sd.image_processor,
                    logit_scale=float(np.log(1.0 / cfg.contrastive_temperature)))
    return [path]
  written = []
  if sd.unet.adapter_config is not None and cfg.export_adapter:
    path = os.path.join(workdir, "ip_adapter.safetensors")
    save_ip_adapter(sd.unet, path, dtype=np.float32)
    written.append(path)
  if cfg.model.trainable in ("unet", "all"):
    path = os.path.join(workdir, "pipeline")
    save_stable_diffusion(sd, path)
    written.append(path)
  return written


def sample_grid(cfg, sd, step: int, workdir: str, metrics: MetricsWriter):
  """A grid of samples from the fixed validation prompts (columns) and images (rows), written to
  `workdir/samples/step_N.png` and TensorBoard. `sd` must already hold the current weights."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.pipeline import IPAdapterPipeline  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.sampling import image_grid  # pylint: disable=import-outside-toplevel
  pipe = IPAdapterPipeline(sd)
  images = [Image.open(p) for p in cfg.sample_images] if sd.unet.image_proj is not None else []
  rows = []
  for image in images or [None]:
    for prompt in cfg.sample_prompts:
      rows.append(pipe(prompt, image, num_inference_steps=cfg.sample_steps, seed=cfg.seed,
                       height=cfg.data.resolution, width=cfg.data.resolution)[0])
  grid = np.asarray(image_grid(np.stack(rows)))
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  Image.fromarray(grid).save(os.path.join(workdir, "samples", f"step_{step:07d}.png"))
  metrics.write_image(step, "samples", grid)


def train(cfg, workdir: str) -> dict:
  """Trains (or resumes) as `cfg` says; returns a summary of the run."""
  from ipadapter_jax.data.input_pipeline import (DataSpec, make_train_iterator,  # pylint: disable=import-outside-toplevel
                                                 open_source)
  os.makedirs(workdir, exist_ok=True)

  # ----- Mesh ------------------------------------------------------------------------------
  initialize_distributed(cfg.mesh)
  try:
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  except ValueError as e:
    raise TrainingError(str(e)) from None
  validate(cfg, mesh)

  # ----- Models ----------------------------------------------------------------------------
  sd = load_models(cfg)
  spec = step_spec(cfg, sd)
  write_run_files(cfg, sd, workdir)
  modules = (sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2, sd.image_encoder)
  graphdef, params, frozen = nnx.split(modules, trainable_filter(cfg.model.trainable), ...)

  # ----- Data ------------------------------------------------------------------------------
  data_spec = DataSpec(resolution=cfg.data.resolution, random_crop=cfg.data.random_crop,
                       clip=sd.image_processor,
                       tokenizer=sd.tokenizer, tokenizer_2=sd.tokenizer_2,
                       image_key=cfg.data.image_key, caption_key=cfg.data.caption_key)
  source = open_source(cfg.data.source, split=cfg.data.split, data_dir=cfg.data.data_dir or None)
  batches = make_train_iterator(source, data_spec, global_batch_size=cfg.batch_size, mesh=mesh,
                                seed=cfg.seed, worker_count=cfg.data.worker_count)
  empty = jax.device_put(empty_conditions(cfg, sd, spec), sharding.replicated(mesh))

  # ----- Train state and shardings ---------------------------------------------------------
  optimizer = make_optimizer(cfg.optimizer, cfg.num_steps)
  lr_schedule = make_schedule(cfg.optimizer, cfg.num_steps)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # trainable weights in float32
  state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                     params if spec.ema_decay > 0 else None)
  state_shardings = sharding.tree_shardings(mesh, state, cfg.mesh.shard_trainable)
  frozen_shardings = sharding.tree_shardings(mesh, frozen, cfg.mesh.shard_frozen)
  # Fresh buffers: donation needs every leaf to own its buffer (optax may share constants).
  state = jax.device_put(jax.tree.map(jnp.array, state), state_shardings)
  frozen = jax.device_put(frozen, frozen_shardings)

  # ----- Restore ---------------------------------------------------------------------------
  checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep_last=cfg.keep_last,
                            keep_every=cfg.keep_every)
  start = checkpoints.latest_step() or 0
  if start:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, state_shardings)
    state, data_state = checkpoints.restore(start, abstract)
    batches.set_state(data_state)
  metrics = MetricsWriter(workdir, resume_step=start)

  # ----- Step function, compiled ahead of the loop -----------------------------------------
  key = jax.random.key(cfg.seed)
  first = next(batches)
  batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(mesh), first)
  replicated = sharding.replicated(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, graphdef=graphdef, spec=spec, optimizer=optimizer),
      in_shardings=(state_shardings, frozen_shardings, batch_shardings, replicated, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  compiled = step_fn.lower(state, frozen, first, empty, key).compile()

  # ----- Loop ------------------------------------------------------------------------------
  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))
  progress = tqdm(total=cfg.num_steps, initial=start, desc="training", unit="step",
                  disable=jax.process_index() != 0)
  step, batch, tick, loss = start, first, time.perf_counter(), None
  try:
    while step < cfg.num_steps:
      state, out = compiled(state, frozen, batch, empty, key)
      loss = float(out["loss"])
      if not np.isfinite(loss):
        raise TrainingError(f"non-finite loss ({loss}) at step {step + 1}; the run stops here "
                            f"and the last checkpoint (step {checkpoints.latest_step()}) is intact")
      step += 1
      progress.update(1)
      if step % cfg.log_every == 0 or step == cfg.num_steps:
        now = time.perf_counter()
        metrics.write(step, {"loss": loss, "learning_rate": float(lr_schedule(step - 1)),
                             "grad_norm": float(out["grad_norm"]),
                             "examples_per_second": cfg.log_every * cfg.batch_size / (now - tick)})
        tick = now
        progress.set_postfix(loss=f"{loss:.4f}")
      if step % cfg.checkpoint_every == 0 or step == cfg.num_steps or stop["signal"]:
        checkpoints.save(step, state, batches.get_state(), force=True)
      if (cfg.sample_every and sd.unet is not None
          and (step % cfg.sample_every == 0 or step == cfg.num_steps)):
        nnx.update(modules, jax.tree.map(_to_host, state.params))  # every process joins
        if jax.process_index() == 0:
          sample_grid(cfg, sd, step, workdir, metrics)
      if stop["signal"]:
        break
      if step < cfg.num_steps:
        batch = next(batches)
  finally:
    checkpoints.wait()
    checkpoints.close()
    metrics.close()
    progress.close()
    signal.signal(signal.SIGTERM, previous)

  summary = {"step": step, "loss": loss, "stopped_by_signal": stop["signal"] is not None}
  if step >= cfg.num_steps:
    final = state.ema if state.ema is not None else state.params
    nnx.update(modules, jax.tree.map(_to_host, final))  # a collective: every process joins
    if jax.process_index() == 0:
      summary["exported"] = export(cfg, sd, workdir)
  return summary


def _to_host(x):
  """A global array as one numpy array on every process (gathered across hosts if needed)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run(cfg, workdir: str) -> int:
  """train() for the command line: a run-ending problem is one line on stderr, exit code 1."""
  import sys  # pylint: disable=import-outside-toplevel
  try:
    summary = train(cfg, workdir)
  except (TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(json.dumps(summary))
  return 0
