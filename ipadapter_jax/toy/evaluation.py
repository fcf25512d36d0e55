"""The toy world's evaluation: held-out prompt images through every setting of the paper's
claims (base, adapter, full fine-tune, community model), scored by the judge and the toy CLIP,
and the claims table with its targets."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from PIL import Image

from ipadapter_jax import evaluate
from ipadapter_jax.generation.pipeline import IPAdapterPipeline
from ipadapter_jax.toy import composition as toy_composition
from ipadapter_jax.toy import shapes, stats
from ipadapter_jax.toy import structure as toy_structure
from ipadapter_jax.toy.configs import world as toy_world
from ipadapter_jax.toy.stages import (
  EVAL_SEED,
  HELD_OUT,
  Sizes,
  log,
  stage_record,
  trainable_parameters,
)
from ipadapter_jax.weights import load_stable_diffusion

# ----- Evaluation --------------------------------------------------------------------------------


def held_out(count: int, seed: int = EVAL_SEED, world: str = "base") -> list[shapes.Example]:
  """Prompt images the models never saw (another seed; by default the evaluation's)."""
  return [shapes.example(seed, i, toy_world.IMAGE_SIZE, world) for i in range(count)]


def other_colour(ex: shapes.Example, index: int) -> str:
  """A colour different from the example's, varied over the examples."""
  others = [c for c in shapes.COLOURS if c != ex.colour]
  return others[index % len(others)]


@dataclasses.dataclass
class PromptSet:
  """Held-out prompt images with their full captions, and a text naming another colour each."""

  examples: list
  images: list  # PIL images
  captions: list[str]
  other_colours: list[str]

  @classmethod
  def make(cls, count: int, seed: int = EVAL_SEED, world: str = "base") -> "PromptSet":
    examples = held_out(count, seed, world)
    size = toy_world.IMAGE_SIZE
    return cls(
      examples,
      [Image.fromarray(shapes.render(ex, size)) for ex in examples],
      [shapes.describe(ex) for ex in examples],
      [other_colour(ex, i) for i, ex in enumerate(examples)],
    )


@dataclasses.dataclass
class Setting:
  """One row of the evaluation: what is asked of which pipeline."""

  name: str
  pipe: object
  prompts: list[str]
  images: list | None
  scale: float
  colours_asked: list[str]
  clip_captions: list[str]  # what CLIP-T compares with


def base_settings(pipe, ps: PromptSet) -> list[Setting]:
  own = [ex.colour for ex in ps.examples]
  return [
    Setting("base, no prompt", pipe, [""] * len(own), None, 0.0, own, ps.captions),
    Setting("base, text only", pipe, ps.captions, None, 0.0, own, ps.captions),
  ]


def image_only(pipe, ps: PromptSet, label: str) -> Setting:
  own = [ex.colour for ex in ps.examples]
  return Setting(
    f"{label}, image only (scale 1.0)", pipe, [""] * len(own), ps.images, 1.0, own, ps.captions
  )


def adapter_settings(pipe, ps: PromptSet, label: str = "adapter") -> list[Setting]:
  mixed = [f"a {c} shape" for c in ps.other_colours]
  return [
    image_only(pipe, ps, label),
    Setting(
      f"{label}, image + other colour in text (scale 0.5)",
      pipe,
      mixed,
      ps.images,
      0.5,
      ps.other_colours,
      mixed,
    ),
  ]


def score_settings(settings: list[Setting], ps: PromptSet, scorer, sizes: Sizes):
  """(rows, generated images per setting): CLIP-I, CLIP-T (means with 95% intervals) and the
  attribute matches (rates with 95% Wilson intervals)."""
  rows, generated = [], {}
  image_embeds = evaluate.image_embeddings(scorer.image_encoder, scorer.processor, ps.images)
  for setting in settings:
    start = time.perf_counter()
    out = evaluate.generate(
      setting.pipe,
      setting.prompts,
      setting.images,
      batch_size=sizes.batch_size,
      seed=0,
      scale=setting.scale,
      guidance_scale=sizes.guidance_scale,
      num_inference_steps=sizes.sampling_steps,
    )
    generated[setting.name] = out
    judged = [shapes.judge(image) for image in evaluate.to_uint8(out)]  # once per image
    embeds = evaluate.image_embeddings(scorer.image_encoder, scorer.processor, out)
    texts = evaluate.text_embeddings(scorer.text_encoder, scorer.tokenizer, setting.clip_captions)
    row = {
      "setting": setting.name,
      "clip_i": stats.mean_ci(evaluate.cosines(embeds, image_embeds)),
      "clip_t": stats.mean_ci(evaluate.clipscores(embeds, texts)),
      **judged_rates(judged, setting.colours_asked, ps.examples),
      "seconds": round(time.perf_counter() - start, 1),
    }
    rows.append(row)
    log(
      f"eval: {setting.name}: colour {row['colour_asked']['rate']:.2f}, "
      f"shape {row['shape_of_image']['rate']:.2f}"
    )
  return rows, generated


def judged_rates(judged: list[dict], colours_asked: list[str], examples) -> dict:
  """The attribute rates of judged images (`shapes.judge`) against the colours asked and the
  prompt images' attributes; "drew_a_shape": whether the judge found any shape at all
  (its best template overlap at least `shapes.DREW_A_SHAPE`)."""
  hits = lambda key, truths: stats.rate([j[key] == t for j, t in zip(judged, truths)])
  return {
    "colour_asked": hits("colour", colours_asked),
    "colour_of_image": hits("colour", [ex.colour for ex in examples]),
    "shape_of_image": hits("shape", [ex.shape for ex in examples]),
    "drew_a_shape": stats.rate([j["overlap"] >= shapes.DREW_A_SHAPE for j in judged]),
    "community_background": stats.rate(
      [j["background"] in shapes.WORLDS["community"] for j in judged]
    ),
  }


def evaluate_toy(
  workdir: str, pretrained: dict[str, str], adapter_file: str, finetune_dir: str, sizes: Sizes
) -> dict:
  """Samples every setting on held-out prompt images; writes grid.png, returns eval.json."""
  ps = PromptSet.make(sizes.eval_images)
  clip_dir, base_dir = pretrained["clip"], pretrained["base"]
  with_adapter = lambda folder, file: IPAdapterPipeline(
    load_stable_diffusion(folder, image_encoder=clip_dir, ip_adapter=file)
  )
  adapter_pipe = with_adapter(base_dir, adapter_file)
  settings = (
    base_settings(IPAdapterPipeline(load_stable_diffusion(base_dir)), ps)
    + adapter_settings(adapter_pipe, ps)
    + [
      image_only(
        with_adapter(
          os.path.join(finetune_dir, "pipeline"),
          os.path.join(finetune_dir, "ip_adapter.safetensors"),
        ),
        ps,
        "full fine-tune",
      ),
      image_only(
        with_adapter(pretrained["community"], adapter_file),
        ps,
        "community model + the same adapter",
      ),
    ]
  )
  rows, generated = score_settings(settings, ps, evaluate.CLIPScorer.load(clip_dir), sizes)
  result = {
    "rows": rows,
    "prompt_images": len(ps.examples),
    "chance": {"colour": 1 / len(shapes.COLOURS), "shape": 1 / len(shapes.SHAPES)},
    "sampling": {
      "num_inference_steps": sizes.sampling_steps,
      "guidance_scale": sizes.guidance_scale,
    },
    "parameters": trainable_parameters(base_dir, clip_dir, adapter_file),
    "training": {name: stage_record(workdir, name) for name in ("adapter", "finetune")},
  }
  result["claims"] = claims(result)
  start = time.perf_counter()
  result["composition"] = toy_composition.composition(
    adapter_pipe,
    ps.examples,
    ps.images,
    count=max(1, sizes.eval_images // 2),
    sampling_steps=sizes.sampling_steps,
    guidance_scale=sizes.guidance_scale,
  )
  log(f"eval: composition with left/right masks, {time.perf_counter() - start:.0f} s")
  start = time.perf_counter()
  common = dict(
    sampling_steps=sizes.sampling_steps,
    guidance_scale=sizes.guidance_scale,
    batch_size=sizes.batch_size,
  )
  validation = PromptSet.make(sizes.strength_pairs, *HELD_OUT["heldout"])
  choice = toy_structure.choose_strength(
    adapter_pipe, validation.examples, validation.images, count=sizes.strength_pairs, **common
  )
  result["structure"] = toy_structure.structure(
    adapter_pipe,
    ps.examples,
    ps.images,
    count=max(1, sizes.eval_images // 2),
    strength=choice["strength"],
    **common,
  )
  result["structure"]["strength_choice"] = choice
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
  ("base, text only", "colour_asked"): 0.90,
  ("base, text only", "shape_of_image"): 0.80,
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
    out.append(
      {
        "claim": claim,
        "measure": f"{setting}: {measure}",
        "value": value,
        "ci95": m["ci95"],
        "target": target,
        "met": None if target is None else bool(value >= target),
      }
    )

  add("base draws what the text names", "base, text only", "colour_asked")
  add("base draws what the text names", "base, text only", "shape_of_image")
  image = "adapter, image only (scale 1.0)"
  for measure in ("colour_of_image", "shape_of_image", "clip_i"):
    add("1. the image prompt alone reproduces the prompt image", image, measure)
  mixed = "adapter, image + other colour in text (scale 0.5)"
  add("2. text and image compose: the text's colour wins", mixed, "colour_asked")
  add("2. text and image compose: the image's shape stays", mixed, "shape_of_image")
  for measure in ("colour_of_image", "shape_of_image", "clip_i"):
    add(
      "3. the adapter is comparable to full fine-tuning",
      "full fine-tune, image only (scale 1.0)",
      measure,
    )
  community = "community model + the same adapter, image only (scale 1.0)"
  for measure in ("colour_of_image", "shape_of_image"):
    add(
      "4. the adapter carries over to a model fine-tuned from the base",
      community,
      measure,
      target=rows[image][measure]["rate"] - 0.10,
    )
  add(
    "4. ... which keeps its own style (backgrounds of the community world)",
    community,
    "community_background",
  )
  return out


def table(result: dict) -> str:
  """eval.json's rows as a Markdown table (rates with their 95% intervals)."""
  pct = stats.pct
  lines = [
    "| setting | CLIP-I | CLIP-T | colour = asked | colour = image | shape = image | "
    "drew a shape | community background |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    lines.append(
      f"| {r['setting']} | {r['clip_i']['mean']:.3f} | {r['clip_t']['mean']:.3f} | "
      f"{pct(r['colour_asked'])} | {pct(r['colour_of_image'])} | "
      f"{pct(r['shape_of_image'])} | {pct(r['drew_a_shape'])} | "
      f"{pct(r['community_background'])} |"
    )
  chance = result["chance"]
  lines.append(
    f"\nChance: colour {chance['colour']:.0%}, shape {chance['shape']:.0%}; "
    f"{result['prompt_images']} held-out prompt images, "
    f"{result['sampling']['num_inference_steps']} DDIM steps, guidance "
    f"{result['sampling']['guidance_scale']}; [95% Wilson interval]."
  )
  return "\n".join(lines)


def claims_table(result: dict) -> str:
  """The claims as a Markdown table: measured value, interval, target."""
  lines = ["| claim | measured | value [95% interval] | target |", "|---|---|---|---|"]
  for c in result["claims"]:
    fmt = (lambda v: f"{v:.3f}") if c["measure"].endswith("clip_i") else (lambda v: f"{v:.0%}")
    target = (
      "" if c["target"] is None else (f">= {fmt(c['target'])} ({'met' if c['met'] else 'not met'})")
    )
    lines.append(
      f"| {c['claim']} | {c['measure']} | {fmt(c['value'])} "
      f"[{fmt(c['ci95'][0])}, {fmt(c['ci95'][1])}] | {target} |"
    )
  p = result["parameters"]
  t = {name: r.get("seconds") for name, r in result["training"].items()}
  lines.append(
    f"\nTrainable parameters: adapter {p['adapter']:,}, full fine-tune "
    f"{p['full fine-tune']:,}; training seconds: adapter {t.get('adapter')}, "
    f"full fine-tune {t.get('finetune')} (this run)."
  )
  return "\n".join(lines)
