r"""The toy world's stages: its data, the pretraining of the weights it ships, and the training
runs of an IP-Adapter experiment, each through the same code as a real run (TFDS builder, the
embedding cache, grain, train.py's loop, Orbax, the exports). A finished stage is reused when it
runs again; an interrupted one resumes from its last checkpoint.

  data       shapes in the official JSON format, built with the image-text TFDS builder
  pretrain   clip       a tiny CLIP trained contrastively          (configs/toy_clip.py)
             vae        a tiny AutoencoderKL, f=4                  (configs/toy_vae.py)
             base       a latent text-to-image UNet                (configs/toy_base.py)
             community  the base fine-tuned on new backgrounds     (configs/toy_community.py)
             image_encoder  the CLIP trained further: the adapter's image encoder
                                                                   (configs/toy_image_encoder.py)
  adapter    the IP-Adapter on the frozen base                     (configs/toy_adapter.py)
  finetune   the baseline: the whole UNet trained with it          (configs/toy_finetune.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.data.cache import build_embedding_cache
from ipadapter_jax.data.image_text import build_image_text_dataset
from ipadapter_jax.data.input_pipeline import DataSpec, open_source
from ipadapter_jax.models import AdapterParam
from ipadapter_jax.models.clip import (
  CLIPTextConfig,
  CLIPTextModel,
  CLIPVisionConfig,
  CLIPVisionModelWithProjection,
)
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig
from ipadapter_jax.preprocessing import CLIPImageConfig
from ipadapter_jax.tokenizer import load_tokenizer, write_word_tokenizer
from ipadapter_jax.toy import shapes
from ipadapter_jax.toy.configs import base as toy_base
from ipadapter_jax.toy.configs import clip as toy_clip
from ipadapter_jax.toy.configs import community as toy_community
from ipadapter_jax.toy.configs import image_encoder as toy_image_encoder
from ipadapter_jax.toy.configs import vae as toy_vae
from ipadapter_jax.toy.configs import world as toy_world
from ipadapter_jax.train.checks import TrainingError
from ipadapter_jax.train.loop import train
from ipadapter_jax.weights import (
  StableDiffusion,
  load_clip_text,
  load_stable_diffusion,
  save_clip_model,
  save_stable_diffusion,
)
from ipadapter_jax.weights.diffusers import load_vae, save_vae
from ipadapter_jax.weights.files import CheckpointError


@dataclasses.dataclass(frozen=True)
class Sizes:
  """How much of everything (the training lengths are the stage configs')."""

  train_examples: int = 10_000
  eval_images: int = 384
  sampling_steps: int = 20
  guidance_scale: float = 1.0  # measured on the validation set: guidance only hurts here
  batch_size: int = 64  # prompt images per sampling call
  validation_images: int = 64  # held-out images scored during training
  num_steps: int | None = None  # every stage's length instead of its config's
  vae_accuracy: float = 0.98  # the judge on the VAE's reconstructions, or no base
  strength_pairs: int = 128  # validation pairs the img2img strength is chosen on


# The CI-sized world: every stage, little work (and a VAE nobody can read).
QUICK = Sizes(
  train_examples=256,
  eval_images=8,
  sampling_steps=5,
  batch_size=8,
  validation_images=4,
  num_steps=10,
  vae_accuracy=0.0,
  strength_pairs=4,
)

SHIPPED = toy_world.SHIPPED
MANIFEST = "MANIFEST.json"
PRETRAINED = ("clip", "base", "community")  # the shipped folders (base/vae is the toy VAE)
# The pretraining's stages, in their order.
STAGES = ("clip", "vae", "base", "community", "image_encoder")


def log(message: str):
  print(f"[toy] {message}", file=sys.stderr, flush=True)


# ----- Data --------------------------------------------------------------------------------------

# name: (seed, world, fraction of full captions). The other captions name a random subset of
# the attributes: the adapter's data ("train") leaves the image to carry what its text lacks;
# the base model's ("base") names everything half of the time, like the rich captions a
# text-to-image model is pretrained on.
DATASETS = {
  "train": (0, "base", 0.0),
  "clip": (2, "all", 1.0),
  "base": (5, "base", 0.5),
  "community": (3, "community", 0.5),
}
# Validation sets (seed, world): scored during training; the evaluation's prompt images are
# another seed (EVAL_SEED), never used to choose anything.
HELD_OUT = {"heldout": (6, "base"), "heldout_community": (4, "community")}
EVAL_SEED = 1


def build_data(workdir: str, sizes: Sizes, names=tuple(DATASETS)):
  """Writes and builds the training sets `names` (DATASETS) as image-text folders, and the
  held-out annotation files the validation reads."""
  for name in names:
    built = os.path.join(workdir, "data", name)
    if os.path.isdir(built):
      continue
    seed, world, full_captions = DATASETS[name]
    log(f"data: writing {sizes.train_examples} shapes and building {built}")
    raw = built + ".raw"
    shutil.rmtree(built + ".tmp", ignore_errors=True)  # what an interrupted build left
    annotations = shapes.write_dataset(
      raw,
      sizes.train_examples,
      seed=seed,
      size=toy_world.IMAGE_SIZE,
      full_captions=full_captions,
      world=world,
    )
    build_image_text_dataset(annotations, raw, built + ".tmp")
    os.replace(built + ".tmp", built)  # a built folder is always a complete one
  for name, (seed, world) in HELD_OUT.items():
    folder = os.path.join(workdir, "data", name)
    if not os.path.exists(os.path.join(folder, "data.json")):
      shapes.write_dataset(
        folder,
        sizes.validation_images,
        seed=seed,
        size=toy_world.IMAGE_SIZE,
        full_captions=True,
        world=world,
      )


# ----- Pretraining: the weights the toy world starts from ----------------------------------------


def write_init_clip(folder: str):
  """A randomly initialised CLIPModel folder with the shapes tokenizer."""
  if os.path.isdir(folder):
    return
  tokenizer_dir = folder + ".tokenizer"
  write_word_tokenizer(
    tokenizer_dir, shapes.WORDS, model_max_length=toy_world.TEXT_CONFIG["max_position_embeddings"]
  )
  tokenizer = load_tokenizer(tokenizer_dir)
  text = CLIPTextModel(
    CLIPTextConfig(vocab_size=len(tokenizer), **toy_world.TEXT_CONFIG), rngs=nnx.Rngs(1)
  )
  vision = CLIPVisionModelWithProjection(
    CLIPVisionConfig(**toy_world.VISION_CONFIG), rngs=nnx.Rngs(2)
  )
  size = toy_world.IMAGE_SIZE
  save_clip_model(
    text,
    vision,
    folder,
    logit_scale=float(np.log(1 / 0.07)),
    tokenizer=tokenizer,
    processor=CLIPImageConfig(size=size, crop_size=(size, size)),
  )


def write_init_vae(folder: str):
  """A randomly initialised AutoencoderKL folder."""
  if os.path.isdir(folder):
    return
  save_vae(AutoencoderKL(VAEConfig.from_diffusers(toy_world.VAE_CONFIG), rngs=nnx.Rngs(4)), folder)


# Compiled once for every call (and every VAE of the same shapes).
_encode_means = nnx.jit(lambda model, x: model.encode(x)[0])
_roundtrip = nnx.jit(lambda model, x: model.decode(model.encode(x)[0]))


def latent_scaling_factor(vae: AutoencoderKL, images: np.ndarray) -> float:
  """1 / the standard deviation of the posterior means of `images` ([N, H, W, 3] in [-1, 1]):
  the factor that gives the diffusion model unit-variance latents, chosen as Stable Diffusion's
  0.18215 was."""
  means = np.concatenate(
    [
      np.asarray(_encode_means(vae, jnp.asarray(images[i : i + 64])))
      for i in range(0, len(images), 64)
    ]
  )
  return float(1.0 / means.std())


def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """The decoded posterior means of uint8 [N, H, W, 3] images, as floats in [0, 1]."""
  out = [
    np.asarray(_roundtrip(vae, jnp.asarray(images[i : i + batch_size], jnp.float32) / 127.5 - 1.0))
    for i in range(0, len(images), batch_size)
  ]
  return np.clip((np.concatenate(out) + 1.0) / 2.0, 0.0, 1.0)


def check_vae(workdir: str, vae: AutoencoderKL, minimum: float, count: int = 600) -> dict:
  """The judge on the VAE's reconstructions of `count` held-out renders of each world, kept in
  the VAE stage's record; stops the pretraining below `minimum` (every attribute right), since
  nothing the toy world measures could then be read from the base's samples."""
  accuracy = {}
  for name, (seed, world) in HELD_OUT.items():
    examples = [shapes.example(seed, i, toy_world.IMAGE_SIZE, world) for i in range(count)]
    renders = np.stack([shapes.render(ex, toy_world.IMAGE_SIZE) for ex in examples])
    accuracy[name] = shapes.judge_accuracy(reconstruct(vae, renders), examples)
    log(f"vae: the judge on {count} reconstructions of {name}: {accuracy[name]}")
  path = os.path.join(workdir, "vae", "stage.json")
  record = {
    **stage_record(workdir, "vae"),
    "judge_on_reconstructions": accuracy,
    "scaling_factor": vae.config.scaling_factor,
  }
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  worst = min(a["all"] for a in accuracy.values())
  if worst < minimum:
    raise TrainingError(
      f"the toy VAE's reconstructions are judged right {worst:.1%} of the "
      f"time, below {minimum:.0%}: train it longer (configs/toy_vae.py) "
      f"before the base"
    )
  return accuracy


def calibrated_vae(vae_dir: str, count: int = 512) -> AutoencoderKL:
  """The trained VAE with its scaling factor measured on `count` images of the base's data."""
  vae = load_vae(vae_dir)
  seed, world, _ = DATASETS["base"]
  images = np.stack(
    [
      shapes.render(shapes.example(seed, i, toy_world.IMAGE_SIZE, world), toy_world.IMAGE_SIZE)
      for i in range(count)
    ]
  )
  factor = latent_scaling_factor(vae, images.astype(np.float32) / 127.5 - 1.0)
  log(f"vae: scaling factor {factor:.4f} (1 / the latents' std on {count} images)")
  vae.config = dataclasses.replace(vae.config, scaling_factor=round(factor, 5))
  return vae


def write_init_base(folder: str, clip_folder: str, vae: AutoencoderKL):
  """A pipeline folder: a randomly initialised UNet, the trained VAE, the trained CLIP text
  tower (without its projection, as Stable Diffusion uses it), the tokenizer and the DDIM
  scheduler settings."""
  if os.path.isdir(folder):
    return
  unet = UNet2DConditionModel(UNetConfig.from_diffusers(toy_world.UNET_CONFIG), rngs=nnx.Rngs(3))
  sd = StableDiffusion(
    unet=unet,
    vae=vae,
    scheduler_config=toy_world.SCHEDULER_CONFIG,
    text_encoder=load_clip_text(clip_folder, with_projection=False),
    tokenizer=load_tokenizer(clip_folder),
  )
  save_stable_diffusion(sd, folder)


def build_cache(workdir: str, name: str, pipeline: str, clip_dir: str) -> str:
  """`data/{name}_cache`: the embedding cache of the built set `data/{name}` made with the VAE
  and text tower of `pipeline` (and the toy CLIP's image tower), as a real run caches its data."""
  out = os.path.join(workdir, "data", f"{name}_cache")
  if os.path.isdir(out):
    return out
  log(f"data: caching {name} with {pipeline}")
  shutil.rmtree(out + ".tmp", ignore_errors=True)
  models = load_stable_diffusion(pipeline, image_encoder=clip_dir)
  spec = DataSpec(resolution=toy_world.IMAGE_SIZE, random_crop=False, clip=None, tokenizer=None)
  build_embedding_cache(
    open_source(os.path.join(workdir, "data", name)), spec, models, out + ".tmp", batch_size=64
  )
  os.replace(out + ".tmp", out)
  return out


def train_stage(
  name: str,
  config_module,
  workdir: str,
  output: str | None,
  num_steps: int | None = None,
  overrides: dict | None = None,
) -> str:
  """Runs (or resumes, or reuses) one train.py stage in `workdir/name`; returns its exported
  `output` (None: the stage exports nothing, its last checkpoint is the result).
  `overrides` sets config keys, {"model.adapter.num_tokens": 8}. The stage's length, time and
  final scores are kept in `workdir/name/stage.json`."""
  cfg = config_module.get_config()
  cfg.update_from_flattened_dict(overrides or {})
  for key in ("pretrained", "image_encoder"):  # configs name paths under the default workdir
    cfg.model[key] = _in_workdir(cfg.model[key], workdir)
  cfg.data.source = _in_workdir(cfg.data.source, workdir)
  for key in ("eval_annotations", "eval_clip"):
    cfg[key] = _in_workdir(cfg[key], workdir)
  cfg.num_steps = num_steps or cfg.num_steps
  stage_dir = os.path.join(workdir, name)
  result = os.path.join(stage_dir, output or os.path.join("checkpoints", str(cfg.num_steps)))
  if os.path.exists(result):
    log(f"{name}: reusing {result}")
    return result
  log(f"{name}: training {cfg.num_steps} steps ({config_module.__name__})")
  start = time.perf_counter()
  summary = train(cfg, stage_dir)
  seconds = time.perf_counter() - start
  log(f"{name}: loss {summary['loss']:.4f} after {summary['step']} steps, {seconds:.0f} s")
  with open(os.path.join(stage_dir, "stage.json"), "w") as f:
    json.dump(
      {
        "config": config_module.__name__,
        "overrides": overrides or {},
        "steps": summary["step"],
        "batch_size": cfg.batch_size,
        "seconds": round(seconds, 1),
        "final_loss": summary["loss"],
        "validation": last_validation(stage_dir),
      },
      f,
      indent=2,
    )
  return result


def _in_workdir(path: str, workdir: str) -> str:
  return path.replace(toy_world.WORKDIR, workdir, 1) if path.startswith(toy_world.WORKDIR) else path


def last_validation(stage_dir: str) -> dict:
  """The last `eval/*` line of a stage's metrics.jsonl ({} if it validated nothing)."""
  last = {}
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if any(k.startswith("eval/") for k in record):
        last = record
  return last


def stage_record(workdir: str, name: str) -> dict:
  path = os.path.join(workdir, name, "stage.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def pretrain(workdir: str, sizes: Sizes) -> dict[str, str]:
  """The CLIP, the VAE, the base and the community model trained from nothing (or reused) in
  `workdir`: {"clip", "base", "community"} -> their exported folders (the pipelines hold the
  VAE)."""
  os.makedirs(workdir, exist_ok=True)
  build_data(workdir, sizes)
  steps = sizes.num_steps
  write_init_clip(os.path.join(workdir, "init", "clip"))
  clip_dir = train_stage("clip", toy_clip, workdir, "clip", steps)
  write_init_vae(os.path.join(workdir, "init", "vae"))
  vae_dir = train_stage("vae", toy_vae, workdir, "vae", steps)
  vae = calibrated_vae(vae_dir)  # a few seconds, and the same every time
  check_vae(workdir, vae, sizes.vae_accuracy)
  init_base = os.path.join(workdir, "init", "base")
  write_init_base(init_base, clip_dir, vae)
  for name in ("base", "community"):
    build_cache(workdir, name, init_base, clip_dir)
  validation = {"eval_limit": sizes.validation_images, "eval_steps": sizes.sampling_steps}
  base_dir = train_stage("base", toy_base, workdir, "pipeline", steps, validation)
  community_dir = train_stage("community", toy_community, workdir, "pipeline", steps, validation)
  image_encoder_dir = train_stage("image_encoder", toy_image_encoder, workdir, "clip", steps)
  return {"clip": image_encoder_dir, "base": base_dir, "community": community_dir}


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(folder: str) -> list[str]:
  return sorted(
    os.path.relpath(os.path.join(root, name), folder)
    for root, _, names in os.walk(folder)
    for name in names
    if name != MANIFEST
  )


def ship(workdir: str, folders: dict[str, str], out: str, command: str):
  """Copies the pretrained folders to `out` with a MANIFEST.json: how each was trained (config,
  steps, time, final validation), on which machine, and every file's sha256."""
  staging = out + ".tmp"
  shutil.rmtree(staging, ignore_errors=True)
  for name, folder in folders.items():
    shutil.copytree(folder, os.path.join(staging, name))
  manifest = {
    "command": command,
    "machine": f"{platform.machine()}, {_cpu_name()}, {os.cpu_count()} cores",
    "stages": {name: stage_record(workdir, name) for name in STAGES},
    "sha256": {path: _sha256(os.path.join(staging, path)) for path in _files(staging)},
  }
  with open(os.path.join(staging, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(staging, out)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or "unknown CPU"


def shipped_weights(folder: str = SHIPPED) -> dict[str, str]:
  """The shipped pretrained folders, after checking every file against MANIFEST.json."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    raise CheckpointError(
      f"{path} is missing: rebuild the toy weights with "
      "`ipadapter-jax toy pretrain` or pass --from_scratch"
    )
  with open(path) as f:
    expected = json.load(f)["sha256"]
  if sorted(expected) != _files(folder):
    raise CheckpointError(f"{folder}: the files differ from those its {MANIFEST} lists")
  for name, digest in expected.items():
    if _sha256(os.path.join(folder, name)) != digest:
      raise CheckpointError(f"{os.path.join(folder, name)}: sha256 differs from {MANIFEST}")
  return {name: os.path.join(folder, name) for name in PRETRAINED}


def prepare_world(workdir: str, sizes: Sizes, from_scratch: bool = False) -> tuple[str, str]:
  """The data, the toy CLIP and the base model (shipped, or pretrained here); returns the
  CLIP and base folders."""
  pretrained = pretrained_weights(workdir, sizes, from_scratch)
  return pretrained["clip"], pretrained["base"]


def pretrained_weights(workdir: str, sizes: Sizes, from_scratch: bool) -> dict[str, str]:
  """The data the adapter needs and the pretrained folders: shipped, or trained here."""
  os.makedirs(workdir, exist_ok=True)
  if from_scratch:
    return pretrain(workdir, sizes)
  build_data(workdir, sizes, names=("train",))
  return shipped_weights()


def trainable_parameters(folder: str, clip_dir: str, adapter_file: str) -> dict[str, int]:
  """{"adapter", "full fine-tune"}: what each trains, the adapter alone or the whole UNet."""
  unet = load_stable_diffusion(folder, image_encoder=clip_dir, ip_adapter=adapter_file).unet
  count = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  return {
    "adapter": count(nnx.state(unet, AdapterParam)),
    "full fine-tune": count(nnx.state(unet, nnx.Param)),
  }
