"""The `sample.py` command: load a model, an image encoder and an adapter, sample, write a grid."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
from PIL import Image, UnidentifiedImageError


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="sample.py",
      description="Generate images from a text prompt and an image prompt with an IP-Adapter "
                  "(DDIM sampling with classifier-free guidance).")
  p.add_argument("--pretrained", required=True,
                 help="diffusers Stable Diffusion folder or hub id")
  p.add_argument("--image_encoder", default=None,
                 help="CLIP image encoder folder or hub id (h94/IP-Adapter/models/image_encoder)")
  p.add_argument("--ip_adapter", default=None, help="official IP-Adapter file (.bin/.safetensors)")
  p.add_argument("--image", default=None, help="the image prompt")
  p.add_argument("--prompt", default="", help="text prompt (empty for image-only prompts)")
  p.add_argument("--negative_prompt", default=None,
                 help="negative text prompt (default: diffusers' default, the empty text; zero "
                      "embeddings for SDXL models with force_zeros_for_empty_prompt)")
  p.add_argument("--scale", type=float, default=1.0, help="adapter scale (0 = base model)")
  p.add_argument("--guidance_scale", type=float, default=7.5)
  p.add_argument("--num_inference_steps", type=int, default=50)
  p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
  p.add_argument("--num_samples", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--height", type=int, default=None, help="default: the model's training size")
  p.add_argument("--width", type=int, default=None)
  p.add_argument("--latents", default=None,
                 help="initial noise .npy in diffusers' layout [num_samples, C, H/8, W/8] "
                      "(replaces the seed's noise)")
  p.add_argument("--out", default="grid.png", help="image grid to write (and a .json beside it)")
  p.add_argument("--save_array", default=None,
                 help="also write the images as float32 [num_samples, H, W, 3] in [0, 1] (.npy)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="weights and compute dtype")
  return p


def image_grid(images: np.ndarray) -> Image.Image:
  """[N, H, W, 3] in [0, 1] -> one PIL image, as square as N allows."""
  n, h, w, _ = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * h, cols * w, 3), np.uint8)
  for i, image in enumerate((images * 255).round().astype(np.uint8)):
    r, c = divmod(i, cols)
    grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
  return Image.fromarray(grid)


def _check_inputs(args):
  for flag in ("image", "ip_adapter", "latents"):
    path = getattr(args, flag)
    if path is not None and not os.path.isfile(path):
      raise FileNotFoundError(f"--{flag} {path}: no such file")
  if args.image is not None and (args.ip_adapter is None or args.image_encoder is None):
    raise ValueError("--image needs --ip_adapter and --image_encoder")


def run(args) -> dict:
  """Samples as `args` say; returns the settings and timings written beside the grid."""
  import jax.numpy as jnp
  from tqdm import tqdm

  from ipadapter_jax.pipeline import IPAdapterPipeline
  from ipadapter_jax.weights import load_stable_diffusion

  _check_inputs(args)
  image = None
  if args.image is not None:
    try:
      image = Image.open(args.image)
      image.load()
    except (UnidentifiedImageError, OSError) as e:
      raise ValueError(f"--image {args.image}: not a readable image ({e})") from None
  latents = np.load(args.latents) if args.latents else None

  start = time.perf_counter()
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  models = load_stable_diffusion(args.pretrained, image_encoder=args.image_encoder,
                                 ip_adapter=args.ip_adapter, dtype=dtype, param_dtype=dtype)
  loaded = time.perf_counter()

  progress = []
  pipe = IPAdapterPipeline(models, on_step=lambda i: progress[0].update(1))
  request = dict(negative_prompt=args.negative_prompt, scale=args.scale,
                 guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
                 eta=args.eta, num_samples=args.num_samples, seed=args.seed, latents=latents,
                 height=args.height, width=args.width)
  pipe.compile(prompt=args.prompt, image=image, **request)
  compiled = time.perf_counter()
  with tqdm(total=args.num_inference_steps, desc="sampling", unit="step", file=sys.stderr) as bar:
    progress.append(bar)
    images = pipe(args.prompt, image, **request)
  done = time.perf_counter()

  image_grid(images).save(args.out)
  if args.save_array:
    np.save(args.save_array, images.astype(np.float32))
  settings = dict(vars(args))
  settings.update(height=int(images.shape[1]), width=int(images.shape[2]),
                  seconds_loading=round(loaded - start, 3),
                  seconds_compiling=round(compiled - loaded, 3),
                  seconds_per_image=round((done - compiled) / args.num_samples, 3))
  with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
    json.dump(settings, f, indent=2)
  print(f"wrote {args.out} ({args.num_samples} images {images.shape[1]}x{images.shape[2]}, "
        f"{settings['seconds_per_image']} s per image after {settings['seconds_compiling']} s "
        "of compilation)")
  return settings


def main(argv=None) -> int:
  from ipadapter_jax.weights.files import CheckpointError
  args = build_parser().parse_args(argv)
  try:
    run(args)
  except (CheckpointError, ValueError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
