"""A run's configuration checked against the mesh and the file system before any work."""

from __future__ import annotations

import json
import os

from ipadapter_jax import storage
from ipadapter_jax.models.attention_kernels import IMPLEMENTATIONS
from ipadapter_jax.train.profiling import parse_steps
from ipadapter_jax.train.step import TRAINABLE
from ipadapter_jax.weights.folders import names_local_or_hub_file

DTYPES = ("float32", "bfloat16")
# Keys a resumed run may change: how long it runs, what it logs, profiles, keeps, samples,
# validates and exports, where it caches compiled programs, and how it is laid out (the mesh, the
# input workers: checkpoints restore onto any mesh and the batches do not depend on the workers).
# Every other key changes what is trained.
RESUMABLE_KEYS = (
  "num_steps",
  "log_every",
  "profile_steps",
  "compilation_cache_dir",
  "checkpoint_every",
  "keep_last",
  "keep_every",
  "sample_every",
  "sample_prompts",
  "sample_images",
  "sample_steps",
  "eval_every",
  "eval_annotations",
  "eval_clip",
  "eval_judge",
  "eval_limit",
  "eval_steps",
  "eval_guidance_scale",
  "eval_batch_size",
  "export_adapter",
  "data.worker_count",
  "data.max_bad_records",
  "data.shuffle_buffer",  # a webdataset stream's saved state refuses a change
  "mesh.data",
  "mesh.fsdp",
  "mesh.shard_frozen",
  "mesh.shard_trainable",
  "mesh.coordinator_address",
  "mesh.num_processes",
  "mesh.process_id",
)


class TrainingError(RuntimeError):
  """A run that must stop: a non-finite loss, a bad configuration."""


def _local_inputs(cfg):
  """(config key, path) of every input the run reads from local disk only."""
  yield "data.data_dir", cfg.data.data_dir
  yield "model.pretrained", cfg.model.pretrained
  yield "model.image_encoder", cfg.model.image_encoder
  yield "model.init_adapter", cfg.model.init_adapter
  yield from ((f"sample_images[{i}]", p) for i, p in enumerate(cfg.sample_images))
  yield "eval_annotations", cfg.eval_annotations


def validate_loop(cfg):
  """Raises TrainingError (one line) for loop settings that cannot run: checked before anything
  is loaded, so that a typo costs no model load or compile."""
  for key in ("num_steps", "log_every", "checkpoint_every", "keep_last"):
    if cfg[key] < 1:
      raise TrainingError(f"{key} must be >= 1, got {cfg[key]}")
  for key in ("keep_every", "sample_every", "eval_every"):
    if cfg[key] < 0:
      raise TrainingError(f"{key} must be >= 0 (0 = off), got {cfg[key]}")
  try:
    parse_steps(cfg.profile_steps)
  except ValueError as e:
    raise TrainingError(str(e)) from None


def validate(cfg, mesh):
  """Raises TrainingError (one line) for a config that cannot run on `mesh`."""
  devices = mesh.size
  if cfg.batch_size % devices:
    raise TrainingError(
      f"batch_size {cfg.batch_size} is not divisible by the {devices} devices "
      f"of the mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
    )
  m = cfg.model
  if m.trainable not in TRAINABLE:
    raise TrainingError(
      f"model.trainable must be one of {', '.join(TRAINABLE)}, got {m.trainable!r}"
    )
  for key in ("frozen_dtype", "compute_dtype"):
    if m[key] not in DTYPES:
      raise TrainingError(f"model.{key} must be one of {list(DTYPES)}, got {m[key]!r}")
  if m.get("attention_implementation") and m.attention_implementation not in IMPLEMENTATIONS:
    raise TrainingError(
      f"model.attention_implementation must be empty (per platform) or one of "
      f"{', '.join(IMPLEMENTATIONS)}, got {m.attention_implementation!r}"
    )
  if m.remat not in ("none", "full", "dots"):
    raise TrainingError(f"model.remat must be none, full or dots, got {m.remat!r}")
  if not cfg.data.source:
    raise TrainingError("data.source is empty: give a built dataset folder or a TFDS name")
  # data.source may be remote: shards, caches and imagefolders are read from gs:// directly.
  for key, path in _local_inputs(cfg):
    if path and storage.is_remote(path):  # outputs may be remote (workdir); inputs are not
      raise TrainingError(
        f"{key}: {path} is remote; inputs are read from local disk (copy it "
        "there first, e.g. with gsutil -m cp -r)"
      )
  if m.init_adapter and not names_local_or_hub_file(m.init_adapter):
    raise TrainingError(
      f"model.init_adapter: {m.init_adapter} is neither a file nor a hub file "
      "id (owner/name/[folder/]file)"
    )
  for key, path in ((f"sample_images[{i}]", p) for i, p in enumerate(cfg.sample_images)):
    if path and not os.path.exists(path):
      raise TrainingError(f"{key}: {path} does not exist")
  if cfg.eval_every:
    if m.trainable in ("clip", "vae"):
      raise TrainingError(f"eval_every: the {m.trainable} stage generates no images to validate")
    for key in ("eval_annotations", "eval_clip"):
      if not cfg[key]:
        raise TrainingError(f"eval_every={cfg.eval_every} needs {key}")
    if not os.path.exists(cfg.eval_annotations):
      raise TrainingError(f"eval_annotations: {cfg.eval_annotations} does not exist")
    if min(cfg.eval_limit, cfg.eval_steps, cfg.eval_batch_size) < 1:
      raise TrainingError("eval_limit, eval_steps and eval_batch_size must be >= 1")
  held_out_grids = cfg.sample_every and not cfg.sample_images and m.trainable in ("adapter", "all")
  if held_out_grids and cfg.eval_annotations and not os.path.exists(cfg.eval_annotations):
    raise TrainingError(
      f"eval_annotations: {cfg.eval_annotations} does not exist (the sample "
      "grids take their image prompts from it)"
    )
  if m.init_adapter and m.trainable not in ("adapter", "all"):
    raise TrainingError(
      f"model.init_adapter is set, but model.trainable={m.trainable!r} trains no adapter"
    )
  if m.init_adapter and m.adapter.attention != "decoupled":
    raise TrainingError(
      f"model.init_adapter: official files hold decoupled adapters; "
      f"model.adapter.attention={m.adapter.attention!r} cannot start from one"
    )
  if m.adapter.attention != "decoupled" and cfg.export_adapter:
    raise TrainingError(
      f"model.adapter.attention={m.adapter.attention!r} has no official "
      "file format: set export_adapter=False (the checkpoints keep it)"
    )
  probabilities = (cfg.dropout.image, cfg.dropout.text, cfg.dropout.both)
  if min(probabilities) < 0 or sum(probabilities) > 1:
    raise TrainingError(f"dropout probabilities {probabilities} must be >= 0 and sum to <= 1")


def _flat(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check_resume(cfg, workdir: str) -> None:
  """Raises TrainingError (one line) when the run in `workdir` was trained with a config that
  differs from `cfg` in a key outside RESUMABLE_KEYS, naming every such key, old and new."""
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    return
  try:
    old = _flat(json.loads(storage.read_text(path)))
  except json.JSONDecodeError as e:
    raise TrainingError(f"{path}: not a readable run config ({e})") from None
  new = _flat(json.loads(cfg.to_json_best_effort()))  # both sides through JSON: tuples as lists
  # A key added to the configs since the run started is unchanged while it keeps an empty value
  # (its off switch: "", 0, False, an empty list).
  old.update({k: v for k, v in new.items() if k not in old and v in ("", 0, False, [], None)})
  shown = lambda flat, k: repr(flat[k]) if k in flat else "(absent)"
  changed = [
    f"{k}: {shown(old, k)} -> {shown(new, k)}"
    for k in sorted(old.keys() | new.keys())
    if shown(old, k) != shown(new, k) and k not in RESUMABLE_KEYS
  ]
  if changed:
    raise TrainingError(
      f"{workdir} holds a run trained with another config ({'; '.join(changed)})"
      "; resume it with its own values or start a new run in another --workdir "
      "(a resume may change num_steps, the logging, checkpoint, sample and eval "
      "settings, and the mesh)"
    )
