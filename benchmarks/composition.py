r"""Sampling with 1, 2 and 4 adapters at once, JAX and diffusers PyTorch side by side.

  python benchmarks/composition.py --config sd15-small [--out composition.json]

The same pipeline folder and adapter file as benchmarks/speed.py (the file loaded 1, 2 or 4
times, one image each, scale 0.5 each), the whole sampling call (encoders, DDIM steps with CFG,
VAE decode) per image, median of repeated calls after warm-up. Each extra adapter adds, per
cross-attention layer and step, one attention over its image tokens; its keys and values are
computed once per call, before the loop (tests/test_composition.py checks the loop's program).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402  pylint: disable=wrong-import-position

COUNTS = (1, 2, 4)


def jax_seconds(bench, paths: dict, count: int, repeats: int) -> float:
  from PIL import Image

  from ipadapter_jax.generation.image_prompts import AdapterPrompt
  from ipadapter_jax.generation.pipeline import IPAdapterPipeline
  from ipadapter_jax.weights import load_stable_diffusion

  pipe = IPAdapterPipeline(
    load_stable_diffusion(
      paths["sd"], image_encoder=paths["image_encoder"], ip_adapter=[paths["adapter"]] * count
    )
  )
  image = Image.open(paths["image"])
  adapters = [AdapterPrompt([image], scale=0.5) for _ in range(count)]
  request = dict(
    adapters=adapters,
    num_inference_steps=bench.steps,
    num_samples=bench.samples,
    guidance_scale=7.5,
    height=bench.image_size,
    width=bench.image_size,
    output_type="np",
  )
  return speed.median_time(lambda: pipe(speed.PROMPT, **request), repeats) / bench.samples


def torch_seconds(bench, paths: dict, count: int, repeats: int) -> float:
  import torch
  from diffusers import StableDiffusionPipeline
  from PIL import Image
  from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

  pipe = StableDiffusionPipeline.from_pretrained(paths["sd"])
  folder, name = os.path.split(paths["adapter"])
  pipe.load_ip_adapter(
    [folder] * count, subfolder=[""] * count, weight_name=[name] * count, image_encoder_folder=None
  )
  pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"])
  pipe.feature_extractor = CLIPImageProcessor.from_pretrained(paths["image_encoder"])
  pipe.set_ip_adapter_scale([0.5] * count)
  pipe.set_progress_bar_config(disable=True)
  image = Image.open(paths["image"])

  def sample():
    with torch.no_grad():
      pipe(
        speed.PROMPT,
        ip_adapter_image=[image] * count,
        num_inference_steps=bench.steps,
        num_images_per_prompt=bench.samples,
        guidance_scale=7.5,
        height=bench.image_size,
        width=bench.image_size,
        output_type="np",
      )

  return speed.median_time(sample, repeats) / bench.samples


def table(result: dict) -> str:
  rows = [
    "| adapters | JAX s/image | relative to one | PyTorch s/image | relative to one | "
    "JAX / PyTorch |",
    "|---|---|---|---|---|---|",
  ]
  j1, t1 = result["jax"]["1"], result["torch"]["1"]
  for count in COUNTS:
    j, t = result["jax"][str(count)], result["torch"][str(count)]
    rows.append(f"| {count} | {j:.3f} | {j / j1:.2f} | {t:.3f} | {t / t1:.2f} | {j / t:.2f} |")
  return "\n".join(rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", choices=sorted(speed.CONFIGS), default="sd15-small")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=None, help="JSON results")
  args = p.parse_args(argv)
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  bench = speed.CONFIGS[args.config]
  paths = speed.write_models(bench, tempfile.mkdtemp(prefix="composition-"))
  result = {
    "config": args.config,
    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    "jax": {str(c): jax_seconds(bench, paths, c, args.repeats) for c in COUNTS},
    "torch": {str(c): torch_seconds(bench, paths, c, args.repeats) for c in COUNTS},
  }
  print(table(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
