r"""The toy world: IP-Adapter's whole pipeline on 16x16 procedural shapes, on a CPU, in one command.

  python -m ipadapter_jax.toy --workdir runs/toy             # the paper's claims, measured
  python -m ipadapter_jax.toy pretrain --out DIR              # the pretrained toy weights, rebuilt

Like a real IP-Adapter run starts from a pretrained Stable Diffusion, the toy world starts from
pretrained toy weights that the package ships (`toy_weights/`, with how they were made and their
sha256 in its MANIFEST.json): a tiny CLIP, a text-to-image base and a "community model"
fine-tuned from the base on a shifted world. `pretrain` rebuilds them from nothing;
`--from_scratch` makes the main command do that first, in its work directory.

Stages, each through the same code as a real run (TFDS builder, grain, train.py's loop, Orbax,
the sampling pipeline, the official export). A finished stage is reused when the command runs
again; an interrupted one resumes from its last checkpoint.

  data       shapes in the official JSON format, built with the image-text TFDS builder
  pretrain   clip       a tiny CLIP trained contrastively       (configs/toy_clip.py)
             base       a pixel-space text-to-image UNet        (configs/toy_base.py)
             community  the base fine-tuned on new backgrounds  (configs/toy_community.py)
  adapter    the IP-Adapter on the frozen base                  (configs/toy_adapter.py)
  finetune   the baseline: the whole UNet trained with it       (configs/toy_finetune.py)
  eval       held-out prompt images: eval.json (every rate with its 95% Wilson interval),
             grid.png and the table of the paper's claims; masked composition, img2img and
             inpainting with an image prompt
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time

import jax
import numpy as np
from flax import nnx
from PIL import Image

from ipadapter_jax import evaluate, toy_composition, toy_structure
from ipadapter_jax.configs import (toy_adapter, toy_base, toy_clip, toy_community, toy_finetune,
                                   toy_world)
from ipadapter_jax.data import shapes
from ipadapter_jax.data.image_text import build_image_text_dataset
from ipadapter_jax.preprocessing import CLIPImageConfig
from ipadapter_jax.tokenizer import load_tokenizer, write_word_tokenizer
from ipadapter_jax.models import AdapterParam
from ipadapter_jax.models.clip import (CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                                       CLIPVisionModelWithProjection)
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
from ipadapter_jax.pipeline import IPAdapterPipeline
from ipadapter_jax.train.checks import TrainingError
from ipadapter_jax.train.loop import train
from ipadapter_jax.weights import (StableDiffusion, load_clip_text, load_stable_diffusion,
                                   save_clip_model, save_stable_diffusion)
from ipadapter_jax.weights.files import CheckpointError

# The toy models. Pixel space: at 16x16 RGB a VAE would save nothing.
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                   bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64)
VISION_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, image_size=16, patch_size=4, num_channels=3,
                     hidden_act="quick_gelu", projection_dim=64)
UNET_CONFIG = dict(  # cross-attention at 8x8, 4x4 and the middle (at 4x4 alone text is learnt slowly)
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, in_channels=3, out_channels=3, sample_size=16)
# Pixel space: DDPM's linear betas. v-prediction weighs the noisy steps (where colour and layout
# are decided) like x0-prediction and the nearly clean ones (the shapes' edges) like
# epsilon-prediction. (An x0-predicting base drew blobs, and classifier-free guidance on x0 leaks
# its overshoot into DDIM's noise estimate.)
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
    "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "v_prediction",
    "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": False,
    "steps_offset": 0, "timestep_spacing": "trailing"}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """How much of everything (the training lengths are the stage configs')."""
  train_examples: int = 10_000
  eval_images: int = 384
  sampling_steps: int = 20
  guidance_scale: float = 1.0         # measured on the validation set: guidance only hurts here
  batch_size: int = 64                # prompt images per sampling call
  validation_images: int = 64         # held-out images scored during training
  num_steps: int | None = None        # every stage's length instead of its config's


QUICK = Sizes(train_examples=256, eval_images=8, sampling_steps=5, batch_size=8,
              validation_images=4, num_steps=10)  # the CI-sized world: every stage, little work

SHIPPED = toy_world.SHIPPED
MANIFEST = "MANIFEST.json"
PRETRAINED = ("clip", "base", "community")  # the shipped folders


def log(message: str):
  print(f"[toy] {message}", file=sys.stderr, flush=True)


# ----- Data --------------------------------------------------------------------------------------

# name: (seed, world, fraction of full captions). The other captions name a random subset of
# the attributes: the adapter's data ("train") leaves the image to carry what its text lacks;
# the base model's ("base") names everything half of the time, like the rich captions a
# text-to-image model is pretrained on.
DATASETS = {"train": (0, "base", 0.0), "clip": (2, "all", 1.0), "base": (5, "base", 0.5),
            "community": (3, "community", 0.5)}
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
    annotations = shapes.write_dataset(raw, sizes.train_examples, seed=seed,
                                       size=VISION_CONFIG["image_size"],
                                       full_captions=full_captions, world=world)
    build_image_text_dataset(annotations, raw, built + ".tmp")
    os.replace(built + ".tmp", built)  # a built folder is always a complete one
  for name, (seed, world) in HELD_OUT.items():
    folder = os.path.join(workdir, "data", name)
    if not os.path.exists(os.path.join(folder, "data.json")):
      shapes.write_dataset(folder, sizes.validation_images, seed=seed,
                           size=VISION_CONFIG["image_size"], full_captions=True, world=world)


# ----- Pretraining: the weights the toy world starts from ----------------------------------------

def write_init_clip(folder: str):
  """A randomly initialised CLIPModel folder with the shapes tokenizer."""
  if os.path.isdir(folder):
    return
  tokenizer_dir = folder + ".tokenizer"
  write_word_tokenizer(tokenizer_dir, shapes.WORDS,
                       model_max_length=TEXT_CONFIG["max_position_embeddings"])
  tokenizer = load_tokenizer(tokenizer_dir)
  text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT_CONFIG), rngs=nnx.Rngs(1))
  vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIG), rngs=nnx.Rngs(2))
  size = VISION_CONFIG["image_size"]
  save_clip_model(text, vision, folder, logit_scale=float(np.log(1 / 0.07)), tokenizer=tokenizer,
                  processor=CLIPImageConfig(size=size, crop_size=(size, size)))


def write_init_base(folder: str, clip_folder: str):
  """A pipeline folder: a randomly initialised UNet, the trained CLIP text tower (without its
  projection, as Stable Diffusion uses it), the tokenizer and the DDIM scheduler settings."""
  if os.path.isdir(folder):
    return
  unet = UNet2DConditionModel(UNetConfig.from_diffusers(UNET_CONFIG), rngs=nnx.Rngs(3))
  sd = StableDiffusion(unet=unet, vae=None, scheduler_config=SCHEDULER_CONFIG,
                       text_encoder=load_clip_text(clip_folder, with_projection=False),
                       tokenizer=load_tokenizer(clip_folder))
  save_stable_diffusion(sd, folder)


def train_stage(name: str, config_module, workdir: str, output: str | None,
                num_steps: int | None = None, overrides: dict | None = None) -> str:
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
    json.dump({"config": config_module.__name__, "overrides": overrides or {},
               "steps": summary["step"], "batch_size": cfg.batch_size,
               "seconds": round(seconds, 1), "final_loss": summary["loss"],
               "validation": last_validation(stage_dir)}, f, indent=2)
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
  """The CLIP, the base and the community model trained from nothing (or reused) in `workdir`:
  {"clip", "base", "community"} -> their exported folders."""
  os.makedirs(workdir, exist_ok=True)
  build_data(workdir, sizes)
  write_init_clip(os.path.join(workdir, "init", "clip"))
  steps = sizes.num_steps
  clip_dir = train_stage("clip", toy_clip, workdir, "clip", steps)
  write_init_base(os.path.join(workdir, "init", "base"), clip_dir)
  validation = {"eval_limit": sizes.validation_images, "eval_steps": sizes.sampling_steps}
  base_dir = train_stage("base", toy_base, workdir, "pipeline", steps, validation)
  community_dir = train_stage("community", toy_community, workdir, "pipeline", steps, validation)
  return {"clip": clip_dir, "base": base_dir, "community": community_dir}


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(folder: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, name), folder)
                for root, _, names in os.walk(folder) for name in names if name != MANIFEST)


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
      "stages": {name: stage_record(workdir, name) for name in folders},
      "sha256": {path: _sha256(os.path.join(staging, path)) for path in _files(staging)}}
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
    raise CheckpointError(f"{path} is missing: rebuild the toy weights with "
                          "`python -m ipadapter_jax.toy pretrain` or pass --from_scratch")
  with open(path) as f:
    expected = json.load(f)["sha256"]
  if sorted(expected) != _files(folder):
    raise CheckpointError(f"{folder}: the files differ from those its {MANIFEST} lists")
  for name, digest in expected.items():
    if _sha256(os.path.join(folder, name)) != digest:
      raise CheckpointError(f"{os.path.join(folder, name)}: sha256 differs from {MANIFEST}")
  return {name: os.path.join(folder, name) for name in PRETRAINED}


def prepare(workdir: str, sizes: Sizes, from_scratch: bool = False) -> tuple[str, str]:
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
  return {"adapter": count(nnx.state(unet, AdapterParam)),
          "full fine-tune": count(nnx.state(unet, nnx.Param))}


# ----- Evaluation --------------------------------------------------------------------------------

def held_out(count: int) -> list[shapes.Example]:
  """Prompt images the models never saw (another seed)."""
  return [shapes.example(seed=EVAL_SEED, index=i, size=VISION_CONFIG["image_size"])
          for i in range(count)]


def other_colour(ex: shapes.Example, index: int) -> str:
  """A colour different from the example's, varied over the examples."""
  others = [c for c in shapes.COLOURS if c != ex.colour]
  return others[index % len(others)]


@dataclasses.dataclass
class PromptSet:
  """Held-out prompt images with their full captions, and a text naming another colour each."""
  examples: list
  images: list          # PIL images
  captions: list[str]
  other_colours: list[str]

  @classmethod
  def make(cls, count: int) -> "PromptSet":
    examples = held_out(count)
    size = VISION_CONFIG["image_size"]
    return cls(examples, [Image.fromarray(shapes.render(ex, size)) for ex in examples],
               [shapes.describe(ex) for ex in examples],
               [other_colour(ex, i) for i, ex in enumerate(examples)])


@dataclasses.dataclass
class Setting:
  """One row of the evaluation: what is asked of which pipeline."""
  name: str
  pipe: object
  prompts: list[str]
  images: list | None
  scale: float
  colours_asked: list[str]
  clip_captions: list[str]   # what CLIP-T compares with


def base_settings(pipe, ps: PromptSet) -> list[Setting]:
  own = [ex.colour for ex in ps.examples]
  return [Setting("base, no prompt", pipe, [""] * len(own), None, 0.0, own, ps.captions),
          Setting("base, text only", pipe, ps.captions, None, 0.0, own, ps.captions)]


def image_only(pipe, ps: PromptSet, label: str) -> Setting:
  own = [ex.colour for ex in ps.examples]
  return Setting(f"{label}, image only (scale 1.0)", pipe, [""] * len(own), ps.images, 1.0, own,
                 ps.captions)


def adapter_settings(pipe, ps: PromptSet, label: str = "adapter") -> list[Setting]:
  mixed = [f"a {c} shape" for c in ps.other_colours]
  return [image_only(pipe, ps, label),
          Setting(f"{label}, image + other colour in text (scale 0.5)", pipe, mixed, ps.images,
                  0.5, ps.other_colours, mixed)]


def _mean_ci(values) -> dict:
  """{"mean", "ci95", "n"}: a mean with its normal-approximation 95% interval."""
  values = np.asarray(values, np.float64)
  half = evaluate.Z_95 * values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else 0.0
  mean = float(values.mean())
  return {"mean": mean, "ci95": [mean - float(half), mean + float(half)], "n": int(values.size)}


def score_settings(settings: list[Setting], ps: PromptSet, scorer, sizes: Sizes):
  """(rows, generated images per setting): CLIP-I, CLIP-T (means with 95% intervals) and the
  attribute matches (rates with 95% Wilson intervals)."""
  rows, generated = [], {}
  image_embeds = evaluate.image_embeddings(scorer.image_encoder, scorer.processor, ps.images)
  for setting in settings:
    start = time.perf_counter()
    out = evaluate.generate(setting.pipe, setting.prompts, setting.images,
                            batch_size=sizes.batch_size, seed=0, scale=setting.scale,
                            guidance_scale=sizes.guidance_scale,
                            num_inference_steps=sizes.sampling_steps)
    generated[setting.name] = out
    asked = evaluate.attribute_matches(out, [{"colour": c, "shape": ex.shape} for c, ex
                                             in zip(setting.colours_asked, ps.examples)])
    own = evaluate.attribute_matches(out, [dataclasses.asdict(ex) for ex in ps.examples])
    community = [shapes.judge(image)["background"] in shapes.WORLDS["community"]
                 for image in evaluate.to_uint8(out)]
    embeds = evaluate.image_embeddings(scorer.image_encoder, scorer.processor, out)
    texts = evaluate.text_embeddings(scorer.text_encoder, scorer.tokenizer, setting.clip_captions)
    row = {"setting": setting.name,
           "clip_i": _mean_ci(np.sum(embeds * image_embeds, axis=-1)),
           "clip_t": _mean_ci(evaluate.CLIPSCORE_WEIGHT
                              * np.maximum(np.sum(embeds * texts, axis=-1), 0.0)),
           "colour_asked": evaluate.rate(asked["colour"]),
           "colour_of_image": evaluate.rate(own["colour"]),
           "shape_of_image": evaluate.rate(own["shape"]),
           "community_background": evaluate.rate(community),
           "seconds": round(time.perf_counter() - start, 1)}
    rows.append(row)
    log(f"eval: {setting.name}: colour {row['colour_asked']['rate']:.2f}, "
        f"shape {row['shape_of_image']['rate']:.2f}")
  return rows, generated


def evaluate_toy(workdir: str, pretrained: dict[str, str], adapter_file: str, finetune_dir: str,
                 sizes: Sizes) -> dict:
  """Samples every setting on held-out prompt images; writes grid.png, returns eval.json."""
  ps = PromptSet.make(sizes.eval_images)
  clip_dir, base_dir = pretrained["clip"], pretrained["base"]
  with_adapter = lambda folder, file: IPAdapterPipeline(load_stable_diffusion(
      folder, image_encoder=clip_dir, ip_adapter=file))
  adapter_pipe = with_adapter(base_dir, adapter_file)
  settings = (base_settings(IPAdapterPipeline(load_stable_diffusion(base_dir)), ps)
              + adapter_settings(adapter_pipe, ps)
              + [image_only(with_adapter(os.path.join(finetune_dir, "pipeline"),
                                         os.path.join(finetune_dir, "ip_adapter.safetensors")),
                            ps, "full fine-tune"),
                 image_only(with_adapter(pretrained["community"], adapter_file), ps,
                            "community model + the same adapter")])
  rows, generated = score_settings(settings, ps, evaluate.CLIPScorer.load(clip_dir), sizes)
  result = {"rows": rows, "prompt_images": len(ps.examples),
            "chance": {"colour": 1 / len(shapes.COLOURS), "shape": 1 / len(shapes.SHAPES)},
            "sampling": {"num_inference_steps": sizes.sampling_steps,
                         "guidance_scale": sizes.guidance_scale},
            "parameters": trainable_parameters(base_dir, clip_dir, adapter_file),
            "training": {name: stage_record(workdir, name) for name in ("adapter", "finetune")}}
  result["claims"] = claims(result)
  start = time.perf_counter()
  result["composition"] = toy_composition.composition(
      adapter_pipe, ps.examples, ps.images, count=max(1, sizes.eval_images // 2),
      sampling_steps=sizes.sampling_steps, guidance_scale=sizes.guidance_scale)
  log(f"eval: composition with left/right masks, {time.perf_counter() - start:.0f} s")
  start = time.perf_counter()
  result["structure"] = toy_structure.structure(
      adapter_pipe, ps.examples, ps.images, count=max(1, sizes.eval_images // 2),
      sampling_steps=sizes.sampling_steps, guidance_scale=sizes.guidance_scale,
      batch_size=sizes.batch_size)
  result["structure"]["seconds"] = round(time.perf_counter() - start, 1)
  log(f"eval: img2img and inpainting with an image prompt, {result['structure']['seconds']:.0f} s")
  columns = [np.stack([np.asarray(i, np.float32) / 255 for i in ps.images])]
  columns += [generated[s.name] for s in settings[1:]]
  write_grid(os.path.join(workdir, "grid.png"), columns, count=min(8, len(ps.examples)))
  return result


def write_grid(path: str, rows: list[np.ndarray], count: int, zoom: int = 4):
  """Rows of [N, H, W, 3] images in [0, 1] (their first `count`), enlarged `zoom` times."""
  grid = np.concatenate([np.concatenate(list(row[:count]), axis=1) for row in rows], axis=0)
  grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
  Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(path)


# ----- The paper's claims ------------------------------------------------------------------------

TARGETS = {  # (row, measure): the toy world's targets for the paper's claims
    ("base, text only", "colour_asked"): 0.90, ("base, text only", "shape_of_image"): 0.80,
    ("adapter, image only (scale 1.0)", "colour_of_image"): 0.85,
    ("adapter, image only (scale 1.0)", "shape_of_image"): 0.70,
    ("adapter, image + other colour in text (scale 0.5)", "colour_asked"): 0.70,
    ("adapter, image + other colour in text (scale 0.5)", "shape_of_image"): 0.60,
}


def claims(result: dict) -> list[dict]:
  """Each claim of the paper as measured rows: {"claim", "measure", "value", "ci95", "target",
  "met"} (met is None where there is no target)."""
  rows = {r["setting"]: r for r in result["rows"]}
  out = []

  def add(claim, setting, measure, target=None):
    m = rows[setting][measure]
    value = m.get("rate", m.get("mean"))
    target = TARGETS.get((setting, measure), target)
    out.append({"claim": claim, "measure": f"{setting}: {measure}", "value": value,
                "ci95": m["ci95"], "target": target,
                "met": None if target is None else bool(value >= target)})

  add("base draws what the text names", "base, text only", "colour_asked")
  add("base draws what the text names", "base, text only", "shape_of_image")
  image = "adapter, image only (scale 1.0)"
  for measure in ("colour_of_image", "shape_of_image", "clip_i"):
    add("1. the image prompt alone reproduces the prompt image", image, measure)
  mixed = "adapter, image + other colour in text (scale 0.5)"
  add("2. text and image compose: the text's colour wins", mixed, "colour_asked")
  add("2. text and image compose: the image's shape stays", mixed, "shape_of_image")
  for measure in ("colour_of_image", "shape_of_image", "clip_i"):
    add("3. the adapter is comparable to full fine-tuning", "full fine-tune, image only "
        "(scale 1.0)", measure)
  community = "community model + the same adapter, image only (scale 1.0)"
  for measure in ("colour_of_image", "shape_of_image"):
    add("4. the adapter carries over to a model fine-tuned from the base", community, measure,
        target=rows[image][measure]["rate"] - 0.10)
  add("4. ... which keeps its own style (backgrounds of the community world)", community,
      "community_background")
  return out


def table(result: dict) -> str:
  """eval.json's rows as a Markdown table (rates with their 95% intervals)."""
  pct = lambda m: f"{m['rate']:.0%} [{m['ci95'][0]:.0%}, {m['ci95'][1]:.0%}]"
  lines = ["| setting | CLIP-I | CLIP-T | colour = asked | colour = image | shape = image | "
           "community background |", "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['setting']} | {r['clip_i']['mean']:.3f} | {r['clip_t']['mean']:.3f} | "
                 f"{pct(r['colour_asked'])} | {pct(r['colour_of_image'])} | "
                 f"{pct(r['shape_of_image'])} | {pct(r['community_background'])} |")
  chance = result["chance"]
  lines.append(f"\nChance: colour {chance['colour']:.0%}, shape {chance['shape']:.0%}; "
               f"{result['prompt_images']} held-out prompt images, "
               f"{result['sampling']['num_inference_steps']} DDIM steps, guidance "
               f"{result['sampling']['guidance_scale']}; [95% Wilson interval].")
  return "\n".join(lines)


def claims_table(result: dict) -> str:
  """The claims as a Markdown table: measured value, interval, target."""
  lines = ["| claim | measured | value [95% interval] | target |", "|---|---|---|---|"]
  for c in result["claims"]:
    fmt = (lambda v: f"{v:.3f}") if c["measure"].endswith("clip_i") else (lambda v: f"{v:.0%}")
    target = "" if c["target"] is None else (f">= {fmt(c['target'])} "
                                             f"({'met' if c['met'] else 'not met'})")
    lines.append(f"| {c['claim']} | {c['measure']} | {fmt(c['value'])} "
                 f"[{fmt(c['ci95'][0])}, {fmt(c['ci95'][1])}] | {target} |")
  p = result["parameters"]
  t = {name: r.get("seconds") for name, r in result["training"].items()}
  lines.append(f"\nTrainable parameters: adapter {p['adapter']:,}, full fine-tune "
               f"{p['full fine-tune']:,}; training seconds: adapter {t.get('adapter')}, "
               f"full fine-tune {t.get('finetune')} (this run).")
  return "\n".join(lines)


# ----- The command -------------------------------------------------------------------------------

def run(workdir: str, quick: bool = False, from_scratch: bool = False,
        sampling_steps: int | None = None) -> dict:
  """Every stage, then the evaluation; prints the tables and returns eval.json's contents."""
  sizes = QUICK if quick else Sizes()
  if sampling_steps:
    sizes = dataclasses.replace(sizes, sampling_steps=sampling_steps)
  start = time.perf_counter()
  pretrained = pretrained_weights(workdir, sizes, from_scratch)
  shared = {"model.pretrained": pretrained["base"], "model.image_encoder": pretrained["clip"],
            "eval_clip": pretrained["clip"], "eval_limit": sizes.validation_images,
            "eval_steps": sizes.sampling_steps}
  adapter_file = train_stage("adapter", toy_adapter, workdir, "ip_adapter.safetensors",
                             sizes.num_steps, shared)
  train_stage("finetune", toy_finetune, workdir, "pipeline", sizes.num_steps, shared)
  log("eval: sampling held-out prompt images")
  result = evaluate_toy(workdir, pretrained, adapter_file, os.path.join(workdir, "finetune"),
                        sizes)
  result["seconds_total"] = round(time.perf_counter() - start, 1)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(table(result) + "\n\n" + claims_table(result) + "\n\n"
        + toy_composition.table(result["composition"]) + "\n\n"
        + toy_structure.table(result["structure"]))
  print(f"\nwrote {os.path.join(workdir, 'eval.json')} and {os.path.join(workdir, 'grid.png')} "
        f"(rows: prompt image, then every setting but the first) in "
        f"{result['seconds_total']:.0f} s")
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m ipadapter_jax.toy", description=__doc__.split("\n")[0])
  p.add_argument("command", nargs="?", default="run", choices=("run", "pretrain"),
                 help="run: the toy world from the shipped weights (default); pretrain: "
                      "rebuild those weights from nothing")
  p.add_argument("--workdir", default=None, help="default: runs/toy (runs/toy_pretrain)")
  p.add_argument("--out", default=SHIPPED, help="pretrain: where the weights are written")
  p.add_argument("--from_scratch", action="store_true",
                 help="run: pretrain in the work directory instead of using the shipped weights")
  p.add_argument("--sampling_steps", type=int, default=None,
                 help=f"DDIM steps of the evaluation (default {Sizes.sampling_steps})")
  p.add_argument("--quick", action="store_true", help="a minute-sized world (for tests)")
  args = p.parse_args(argv)
  try:
    if args.command == "pretrain":
      workdir = args.workdir or "runs/toy_pretrain"
      sizes = QUICK if args.quick else Sizes()
      folders = pretrain(workdir, sizes)
      ship(workdir, folders, args.out,
           command="python -m ipadapter_jax.toy pretrain" + (" --quick" if args.quick else ""))
      print(f"wrote {args.out} ({MANIFEST}: how it was made and every file's sha256)")
    else:
      run(args.workdir or toy_world.WORKDIR, args.quick, args.from_scratch, args.sampling_steps)
  except (TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
