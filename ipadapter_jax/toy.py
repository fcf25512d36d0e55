r"""The toy world: IP-Adapter's whole pipeline on 16x16 procedural shapes, on a CPU, in one command.

  python -m ipadapter_jax.toy --workdir runs/toy

Stages, each through the same code as a real run (TFDS builder, grain, train.py's loop, Orbax,
the sampling pipeline, the official export). A finished stage is reused when the command runs
again; an interrupted one resumes from its last checkpoint.

  data     shapes in the official JSON format, built with the image-text TFDS builder
  init     a word tokenizer and randomly initialised models, written as transformers / diffusers
           folders
  clip     a tiny CLIP trained contrastively       (configs/toy_clip.py)    -> clip/clip
  base     a pixel-space text-to-image UNet        (configs/toy_base.py)    -> base/pipeline
  adapter  the IP-Adapter on the frozen base       (configs/toy_adapter.py) -> adapter/ip_adapter.safetensors
  eval     held-out prompt images: eval.json, grid.png and a table of CLIP-I, CLIP-T and
           attribute matches (read from the pixels, no trained model)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import numpy as np
from flax import nnx
from PIL import Image

from ipadapter_jax import evaluate
from ipadapter_jax.configs import toy_adapter, toy_base, toy_clip, toy_world
from ipadapter_jax.data import shapes
from ipadapter_jax.data.image_text import build_image_text_dataset
from ipadapter_jax.preprocessing import CLIPImageConfig
from ipadapter_jax.tokenizer import load_tokenizer, write_word_tokenizer
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
SCHEDULER_CONFIG = {  # pixel space: DDPM's linear betas; predicting x0 gives clean flat colours
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
    "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "sample",
    "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": False,
    "steps_offset": 0, "timestep_spacing": "trailing"}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """How much of everything (the training lengths are the stage configs')."""
  train_examples: int = 10_000
  eval_images: int = 96
  sampling_steps: int = 40
  guidance_scale: float = 3.0
  batch_size: int = 32                # prompt images per sampling call
  num_steps: int | None = None        # every stage's length instead of its config's


QUICK = Sizes(train_examples=256, eval_images=8, sampling_steps=5, batch_size=8,
              num_steps=10)  # the CI-sized world: every stage, little work


def log(message: str):
  print(f"[toy] {message}", file=sys.stderr, flush=True)


# ----- Stages ------------------------------------------------------------------------------------

def build_data(workdir: str, sizes: Sizes):
  """Writes and builds the shapes: `data/train` (captions name a random subset of the attributes)
  for the base model and the adapter, `data/clip` (captions name all of them) for the CLIP."""
  for name, seed, full_captions in (("train", 0, False), ("clip", 2, True)):
    built = os.path.join(workdir, "data", name)
    if os.path.isdir(built):
      continue
    log(f"data: writing {sizes.train_examples} shapes and building {built}")
    raw = built + ".raw"
    shutil.rmtree(built + ".tmp", ignore_errors=True)  # what an interrupted build left
    annotations = shapes.write_dataset(raw, sizes.train_examples, seed=seed,
                                       size=VISION_CONFIG["image_size"],
                                       full_captions=full_captions)
    build_image_text_dataset(annotations, raw, built + ".tmp")
    os.replace(built + ".tmp", built)  # a built folder is always a complete one


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
  `overrides` sets config keys, {"model.adapter.num_tokens": 8}."""
  cfg = config_module.get_config()
  cfg.update_from_flattened_dict(overrides or {})
  for key in ("pretrained", "image_encoder"):  # configs name paths under the default workdir
    cfg.model[key] = cfg.model[key].replace(_default_workdir(), workdir, 1)
  cfg.data.source = cfg.data.source.replace(_default_workdir(), workdir, 1)
  cfg.num_steps = num_steps or cfg.num_steps
  stage_dir = os.path.join(workdir, name)
  result = os.path.join(stage_dir, output or os.path.join("checkpoints", str(cfg.num_steps)))
  if os.path.exists(result):
    log(f"{name}: reusing {result}")
    return result
  log(f"{name}: training {cfg.num_steps} steps ({config_module.__name__})")
  start = time.perf_counter()
  summary = train(cfg, stage_dir)
  log(f"{name}: loss {summary['loss']:.4f} after {summary['step']} steps, "
      f"{time.perf_counter() - start:.0f} s")
  return result


def _default_workdir() -> str:
  return toy_world.WORKDIR


# ----- Evaluation --------------------------------------------------------------------------------

def held_out(count: int) -> list[shapes.Example]:
  """Prompt images the models never saw (another seed)."""
  return [shapes.example(seed=1, index=i, size=VISION_CONFIG["image_size"]) for i in range(count)]


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


def adapter_settings(pipe, ps: PromptSet, label: str = "adapter") -> list[Setting]:
  own = [ex.colour for ex in ps.examples]
  mixed = [f"a {c} shape" for c in ps.other_colours]
  return [Setting(f"{label}, image only (scale 1.0)", pipe, [""] * len(own), ps.images, 1.0,
                  own, ps.captions),
          Setting(f"{label}, image + other colour in text (scale 0.5)", pipe, mixed, ps.images,
                  0.5, ps.other_colours, mixed)]


def score_settings(settings: list[Setting], ps: PromptSet, scorer, sizes: Sizes):
  """(rows, generated images per setting): CLIP-I, CLIP-T and the attribute matches."""
  rows, generated = [], {}
  for setting in settings:
    start = time.perf_counter()
    out = evaluate.generate(setting.pipe, setting.prompts, setting.images,
                            batch_size=sizes.batch_size, seed=0, scale=setting.scale,
                            guidance_scale=sizes.guidance_scale,
                            num_inference_steps=sizes.sampling_steps)
    generated[setting.name] = out
    asked = evaluate.attribute_scores(out, [{"colour": c, "shape": ex.shape} for c, ex
                                            in zip(setting.colours_asked, ps.examples)])
    own = evaluate.attribute_scores(out, [dataclasses.asdict(ex) for ex in ps.examples])
    row = {"setting": setting.name, **scorer.score(out, ps.images, setting.clip_captions),
           "colour_asked": asked["colour_match"], "colour_of_image": own["colour_match"],
           "shape_of_image": own["shape_match"], "seconds": round(time.perf_counter() - start, 1)}
    rows.append(row)
    log(f"eval: {setting.name}: colour {row['colour_asked']:.2f}, "
        f"shape {row['shape_of_image']:.2f}")
  return rows, generated


def evaluate_toy(workdir: str, clip_dir: str, base_dir: str, adapter_file: str,
                 sizes: Sizes) -> dict:
  """Samples the four settings on held-out prompt images; writes eval.json and grid.png."""
  ps = PromptSet.make(sizes.eval_images)
  base = IPAdapterPipeline(load_stable_diffusion(base_dir))
  adapted = IPAdapterPipeline(load_stable_diffusion(base_dir, image_encoder=clip_dir,
                                                    ip_adapter=adapter_file))
  settings = base_settings(base, ps) + adapter_settings(adapted, ps)
  rows, generated = score_settings(settings, ps, evaluate.CLIPScorer.load(clip_dir), sizes)
  result = {"rows": rows, "prompt_images": len(ps.examples),
            "chance": {"colour": 1 / len(shapes.COLOURS), "shape": 1 / len(shapes.SHAPES)},
            "sampling": {"num_inference_steps": sizes.sampling_steps,
                         "guidance_scale": sizes.guidance_scale}}
  columns = [np.stack([np.asarray(i, np.float32) / 255 for i in ps.images])]
  columns += [generated[s.name] for s in settings[1:]]
  write_grid(os.path.join(workdir, "grid.png"), columns, count=min(8, len(ps.examples)))
  return result


def write_grid(path: str, rows: list[np.ndarray], count: int, zoom: int = 4):
  """Rows of [N, H, W, 3] images in [0, 1] (their first `count`), enlarged `zoom` times."""
  grid = np.concatenate([np.concatenate(list(row[:count]), axis=1) for row in rows], axis=0)
  grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
  Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(path)


def table(result: dict) -> str:
  """eval.json's rows as a Markdown table."""
  lines = ["| setting | CLIP-I | CLIP-T | colour = asked | colour = image | shape = image |",
           "|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['setting']} | {r['clip_i']:.3f} | {r['clip_t']:.3f} | "
                 f"{r['colour_asked']:.0%} | {r['colour_of_image']:.0%} | "
                 f"{r['shape_of_image']:.0%} |")
  chance = result["chance"]
  lines.append(f"\nChance: colour {chance['colour']:.0%}, shape {chance['shape']:.0%}; "
               f"{result['prompt_images']} held-out prompt images, "
               f"{result['sampling']['num_inference_steps']} DDIM steps, guidance "
               f"{result['sampling']['guidance_scale']}.")
  return "\n".join(lines)


# ----- The command -------------------------------------------------------------------------------

def prepare(workdir: str, sizes: Sizes) -> tuple[str, str]:
  """The data, the toy CLIP and the base model (built or reused); returns their folders."""
  os.makedirs(workdir, exist_ok=True)
  build_data(workdir, sizes)
  write_init_clip(os.path.join(workdir, "init", "clip"))
  clip_dir = train_stage("clip", toy_clip, workdir, "clip", sizes.num_steps)
  write_init_base(os.path.join(workdir, "init", "base"), clip_dir)
  base_dir = train_stage("base", toy_base, workdir, "pipeline", sizes.num_steps)
  return clip_dir, base_dir


def run(workdir: str, quick: bool = False) -> dict:
  """Every stage, then the evaluation; prints the table and returns eval.json's contents."""
  sizes = QUICK if quick else Sizes()
  start = time.perf_counter()
  clip_dir, base_dir = prepare(workdir, sizes)
  adapter_file = train_stage("adapter", toy_adapter, workdir, "ip_adapter.safetensors",
                             sizes.num_steps)
  log("eval: sampling held-out prompt images")
  result = evaluate_toy(workdir, clip_dir, base_dir, adapter_file, sizes)
  result["seconds_total"] = round(time.perf_counter() - start, 1)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(table(result))
  print(f"\nwrote {os.path.join(workdir, 'eval.json')} and {os.path.join(workdir, 'grid.png')} "
        f"(rows: prompt image, text only, image only, image + text) in "
        f"{result['seconds_total']:.0f} s")
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m ipadapter_jax.toy", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/toy")
  p.add_argument("--quick", action="store_true", help="a minute-sized world (for tests)")
  args = p.parse_args(argv)
  try:
    run(args.workdir, args.quick)
  except (TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
