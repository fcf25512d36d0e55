"""The `sample.py` command: load a model, an image encoder and an adapter, sample, write a grid."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np

from ipadapter_jax import storage
from ipadapter_jax.cli.common import Parser, UsageError, run_command

SAMPLER_NAMES = (
  "ddim",
  "euler",
  "euler_a",
  "dpmpp_2m",
  "dpmpp_2m_karras",
  "ddpm",
  "unipc",
)  # = diffusion.SAMPLERS


def build_parser() -> argparse.ArgumentParser:
  p = Parser(
    prog="ipadapter-jax sample",
    description="Generate images from a text prompt and image prompts with IP-Adapters "
    "(text-to-image, img2img or inpainting; DDIM, Euler, DPM-Solver++, UniPC and other "
    "samplers with classifier-free guidance).",
  )
  p.add_argument("--pretrained", required=True, help="diffusers Stable Diffusion folder or hub id")
  p.add_argument(
    "--revision",
    default=None,
    help="hub revision of --pretrained: a branch, tag or commit (default: the main branch)",
  )
  p.add_argument(
    "--variant",
    default=None,
    help="weights variant of --pretrained and --controlnet to read, such as fp16 "
    "(only those files are downloaded; default: the full-precision files)",
  )
  p.add_argument(
    "--image_encoder",
    default=None,
    help="CLIP image encoder folder or hub id (h94/IP-Adapter/models/image_encoder)",
  )
  p.add_argument(
    "--ip_adapter",
    action="append",
    default=[],
    metavar="FILE",
    help="official IP-Adapter file (.bin/.safetensors); repeat for several adapters "
    "(each flag below is then given once per --ip_adapter, in the same order)",
  )
  p.add_argument(
    "--image",
    action="append",
    default=[],
    metavar="PATHS",
    help="one adapter's image prompt(s), comma-separated (their tokens are concatenated)",
  )
  p.add_argument(
    "--scale",
    action="append",
    default=[],
    metavar="VALUE",
    help="one adapter's scale: a float (0 = off), a preset (style, "
    "style_and_layout) or a JSON block dictionary such as "
    "'{\"up\": {\"block_0\": [0.0, 1.0, 0.0]}}' (default 1.0)",
  )
  p.add_argument(
    "--mask",
    action="append",
    default=[],
    metavar="PATHS",
    help="one adapter's masks, one per image, comma-separated ('' = none)",
  )
  p.add_argument(
    "--ip_window",
    action="append",
    default=[],
    metavar="START,END",
    help="fractions of the sampling steps in which the adapter acts (default 0,1)",
  )
  p.add_argument(
    "--negative_image",
    action="append",
    default=[],
    metavar="PATH",
    help="one adapter's negative image prompt ('' = the unconditional one)",
  )
  p.add_argument(
    "--save_image_embeds",
    default=None,
    metavar="FILE",
    help="also write the adapters' image embeddings to FILE (.safetensors)",
  )
  p.add_argument(
    "--image_embeds",
    action="append",
    default=[],
    metavar="FILE",
    help="saved image embeddings instead of --image (no image encoder needed)",
  )
  p.add_argument(
    "--init_image",
    default=None,
    metavar="PATH",
    help="img2img: start from this image, noised to --strength (with --mask_image: inpainting)",
  )
  p.add_argument(
    "--strength",
    type=float,
    default=None,
    help="how much of the init image is replaced, in [0, 1] (default as diffusers: "
    "img2img 0.8, SDXL 0.3; inpainting 1.0, SDXL 0.9999)",
  )
  p.add_argument(
    "--mask_image",
    default=None,
    metavar="PATH",
    help="inpainting: repaint the white part of --init_image, keep the rest",
  )
  p.add_argument(
    "--controlnet",
    action="append",
    default=[],
    metavar="DIR",
    help="diffusers ControlNet folder or hub id; repeat for several (their "
    "residuals are summed), each with its --control_image, in order",
  )
  p.add_argument(
    "--control_image",
    action="append",
    default=[],
    metavar="PATH",
    help="one ControlNet's conditioning image (a pose, depth or edge map)",
  )
  p.add_argument(
    "--controlnet_conditioning_scale",
    action="append",
    type=float,
    default=[],
    metavar="X",
    help="one ControlNet's scale, or one value for all (default 1.0)",
  )
  p.add_argument(
    "--control_guidance_start",
    action="append",
    type=float,
    default=[],
    metavar="F",
    help="fraction of the steps at which a ControlNet starts "
    "(default 0.0; once for all or once per ControlNet)",
  )
  p.add_argument(
    "--control_guidance_end",
    action="append",
    type=float,
    default=[],
    metavar="F",
    help="fraction of the steps at which a ControlNet stops (default 1.0)",
  )
  p.add_argument(
    "--guess_mode",
    action="store_true",
    help="ControlNet guess mode (the ControlNets see the positive half only)",
  )
  p.add_argument(
    "--t2i_adapter",
    default=None,
    metavar="DIR",
    help="diffusers T2I-Adapter folder or hub id (structure control, as "
    "StableDiffusionXLAdapterPipeline)",
  )
  p.add_argument(
    "--adapter_image", default=None, metavar="PATH", help="the T2I-Adapter's input image"
  )
  p.add_argument("--adapter_conditioning_scale", type=float, default=1.0)
  p.add_argument(
    "--adapter_conditioning_factor",
    type=float,
    default=1.0,
    help="fraction of the steps in which the T2I-Adapter acts",
  )
  p.add_argument("--prompt", default="", help="text prompt (empty for image-only prompts)")
  p.add_argument(
    "--negative_prompt",
    default=None,
    help="negative text prompt (default: diffusers' default, the empty text; zero "
    "embeddings for SDXL models with force_zeros_for_empty_prompt)",
  )
  p.add_argument("--guidance_scale", type=float, default=7.5)
  p.add_argument(
    "--scheduler",
    default=None,
    choices=sorted(SAMPLER_NAMES),
    help="sampler (ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddpm, unipc), built "
    "from the model folder's scheduler config as diffusers' "
    "from_config builds it (default: the one that config names; DDIM for a "
    "scheduler not implemented here, such as SD1.5's PNDM)",
  )
  p.add_argument("--num_inference_steps", type=int, default=50)
  p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
  p.add_argument("--num_samples", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--height", type=int, default=None, help="default: the model's training size")
  p.add_argument("--width", type=int, default=None)
  p.add_argument(
    "--latents",
    default=None,
    help="initial noise .npy in diffusers' layout [num_samples, C, H/8, W/8] "
    "(replaces the seed's noise; with --init_image the noise added to its "
    "latents, with --mask_image diffusers' latents= argument)",
  )
  p.add_argument(
    "--out",
    default="grid.png",
    help="image grid to write, with each image beside it (grid_0.png, grid_1.png, "
    "...) and the settings (grid.json)",
  )
  p.add_argument(
    "--grid_only", action="store_true", help="write the grid alone, not one file per image"
  )
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace existing output files (without it they are refused before anything is loaded)",
  )
  p.add_argument(
    "--save_array",
    default=None,
    help="also write the images as float32 [num_samples, H, W, 3] in [0, 1] (.npy)",
  )
  p.add_argument(
    "--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and compute dtype"
  )
  return p


def _per_adapter(args, flag: str, count: int) -> list:
  values = getattr(args, flag)
  if values and len(values) != count:
    raise ValueError(
      f"--{flag} given {len(values)} times for {count} --ip_adapter: give it "
      "once per adapter, in the same order"
    )
  return values


def _paths(text: str) -> list[str]:
  return [p for p in text.split(",") if p]


def adapter_prompts(args) -> list | None:
  """The per-adapter flags as `AdapterPrompt`s (None: no image prompt), all files read."""
  from ipadapter_jax.generation.adapter_scales import parse_scale
  from ipadapter_jax.generation.image_prompts import AdapterPrompt, load_image_embeds, open_image
  from ipadapter_jax.weights.folders import names_local_or_hub_file

  count = len(args.ip_adapter)
  for path in args.ip_adapter:
    if not names_local_or_hub_file(path):
      raise FileNotFoundError(
        f"--ip_adapter {path}: no such file, and not a hub file id (owner/name/[folder/]file)"
      )
  if args.image and args.image_embeds:
    raise ValueError("give --image or --image_embeds, not both")
  if not count:
    if args.image or args.image_embeds:
      raise ValueError("--image needs --ip_adapter and --image_encoder")
    for flag in ("scale", "mask", "ip_window", "negative_image", "save_image_embeds"):
      if getattr(args, flag):
        raise ValueError(f"--{flag} needs --ip_adapter")
    return None
  images = _per_adapter(args, "image", count)
  if not images and not args.image_embeds:
    raise ValueError("--ip_adapter needs --image (or --image_embeds)")
  if images and args.image_encoder is None:
    raise ValueError("--image needs --ip_adapter and --image_encoder")
  scales = [parse_scale(v) for v in _per_adapter(args, "scale", count)] or [1.0] * count
  masks = _per_adapter(args, "mask", count) or [""] * count
  windows = _per_adapter(args, "ip_window", count) or ["0,1"] * count
  negatives = _per_adapter(args, "negative_image", count) or [""] * count
  embeds = [e for path in args.image_embeds for e in load_image_embeds(path)]
  if args.image_embeds and len(embeds) != count:
    raise ValueError(
      f"--image_embeds hold {len(embeds)} adapters' embeddings for {count} --ip_adapter"
    )
  prompts = []
  for a in range(count):
    own = [open_image(p, "--image") for p in _paths(images[a])] if images else []
    if images and not own:
      raise ValueError(f"--image {images[a]!r}: no image paths")
    mask = [open_image(p, "--mask") for p in _paths(masks[a])] or None
    num_images = len(own) if own else embeds[a].shape[1]
    if mask is not None and len(mask) != num_images:
      raise ValueError(
        f"--mask for adapter {a}: {len(mask)} masks for {num_images} images: "
        "give one mask per image"
      )
    prompts.append(
      AdapterPrompt(
        images=own,
        embeds=embeds[a] if embeds else None,
        scale=scales[a],
        masks=mask,
        window=tuple(windows[a].split(",")),  # checked with the rest of the request
        negative_image=open_image(negatives[a], "--negative_image") if negatives[a] else None,
      )
    )
  return prompts


def structure_control(args) -> dict:
  """The ControlNet and T2I-Adapter flags as request arguments, all images read."""
  from ipadapter_jax.generation.image_prompts import open_image

  nets = len(args.controlnet)
  if len(args.control_image) != nets:
    raise ValueError(
      f"{len(args.control_image)} --control_image for {nets} --controlnet: give "
      "one per ControlNet, in the same order"
    )
  out = {}
  if nets:
    out["control_images"] = [open_image(p, "--control_image") for p in args.control_image]
    for flag, default in (
      ("controlnet_conditioning_scale", 1.0),
      ("control_guidance_start", 0.0),
      ("control_guidance_end", 1.0),
    ):
      values = getattr(args, flag)
      if len(values) not in (0, 1, nets):
        raise ValueError(
          f"--{flag} given {len(values)} times for {nets} --controlnet: give it "
          "once for all or once per ControlNet"
        )
      out[flag] = values[0] if len(values) == 1 else (values or default)
    out["guess_mode"] = args.guess_mode
  else:
    for flag in (
      "controlnet_conditioning_scale",
      "control_guidance_start",
      "control_guidance_end",
      "guess_mode",
    ):
      if getattr(args, flag):
        raise ValueError(f"--{flag} needs --controlnet")
  if (args.t2i_adapter is None) != (args.adapter_image is None):
    raise ValueError("--t2i_adapter and --adapter_image go together")
  if args.t2i_adapter is not None:
    out.update(
      adapter_image=open_image(args.adapter_image, "--adapter_image", mode=None),
      adapter_conditioning_scale=args.adapter_conditioning_scale,
      adapter_conditioning_factor=args.adapter_conditioning_factor,
    )
  return out


def _settings_path(out: str) -> str:
  return os.path.splitext(out)[0] + ".json"


def _image_paths(args) -> list[str]:
  """One file per image beside the grid, in its format: grid.png -> grid_0.png, grid_1.png..."""
  if args.grid_only:
    return []
  stem, ext = os.path.splitext(args.out)
  return [f"{stem}_{k}{ext}" for k in range(max(args.num_samples, 0))]


def _encoded(image, image_format: str) -> bytes:
  """A PIL image as the bytes of an image file (written through `storage`, local or remote)."""
  out = io.BytesIO()
  image.save(out, format=image_format)
  return out.getvalue()


def _array_path(path: str) -> str:
  """Where np.save puts `path`: .npy is added when missing."""
  return path if path.endswith(".npy") else path + ".npy"


def check_outputs(args) -> None:
  """Refuses, in one line, an output that could not be written or would replace a file without
  --overwrite: before anything is loaded, not after the sampling."""
  from PIL import Image

  if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
    raise ValueError(f"--out {args.out}: not an image file name (.png, .jpg, ...)")
  if args.save_image_embeds and not args.save_image_embeds.endswith(".safetensors"):
    raise ValueError(
      f"--save_image_embeds {args.save_image_embeds}: image embeddings are written as .safetensors"
    )
  outputs = [
    ("--out", args.out, None),
    (
      "--out",
      _settings_path(args.out),
      f"{_settings_path(args.out)} (the settings written beside --out {args.out})",
    ),
    ("--save_array", args.save_array and _array_path(args.save_array), None),
    ("--save_image_embeds", args.save_image_embeds, None),
  ]
  outputs += [
    ("--out", path, f"{path} (image {k}, written beside --out {args.out})")
    for k, path in enumerate(_image_paths(args))
  ]
  for flag, path, name in outputs:
    if path:
      storage.check_output(
        path, "sample.py", folder=False, flag=flag, overwrite=args.overwrite, name=name
      )


def checked_flags(args):
  """(adapters, latents, conditions) from the flags, every file and number checked."""
  from ipadapter_jax.generation.image_prompts import open_image
  from ipadapter_jax.generation.structure import finite
  from ipadapter_jax.weights.folders import parse_hub_id

  check_outputs(args)
  if not os.path.exists(args.pretrained):
    parse_hub_id(args.pretrained)  # a hub id's form, or one line: no such folder
  for flag in (
    "guidance_scale",
    "eta",
    "strength",
    "adapter_conditioning_scale",
    "adapter_conditioning_factor",
  ):
    if getattr(args, flag) is not None:
      finite(flag, getattr(args, flag))
  if args.latents is not None and not os.path.isfile(args.latents):
    raise FileNotFoundError(f"--latents {args.latents}: no such file")
  adapters = adapter_prompts(args)
  latents = np.load(args.latents) if args.latents else None
  if args.mask_image and not args.init_image:
    raise ValueError("--mask_image needs --init_image (the image to inpaint)")
  if args.strength is not None and not args.init_image:
    raise ValueError("--strength needs --init_image")
  conditions = {}
  if args.init_image:
    conditions = dict(
      init_image=open_image(args.init_image, "--init_image"), strength=args.strength
    )
  if args.mask_image:
    conditions["mask_image"] = open_image(args.mask_image, "--mask_image")
  conditions.update(structure_control(args))
  return adapters, latents, conditions


def sample_from_flags(args) -> dict:
  """Samples as `args` say; returns the settings and timings written beside the grid."""
  import jax.numpy as jnp
  from tqdm import tqdm

  from ipadapter_jax.diffusion.samplers import default_sampler
  from ipadapter_jax.generation.image_prompts import save_image_embeds
  from ipadapter_jax.generation.pipeline import IPAdapterPipeline, pil_images
  from ipadapter_jax.preprocessing import image_grid
  from ipadapter_jax.weights import load_stable_diffusion

  try:  # what the flags name, checked before anything loads: a usage error
    adapters, latents, conditions = checked_flags(args)
  except (ValueError, OSError) as e:
    raise UsageError(str(e)) from e

  start = time.perf_counter()
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  models = load_stable_diffusion(
    args.pretrained,
    image_encoder=args.image_encoder,
    ip_adapter=args.ip_adapter or None,
    dtype=dtype,
    param_dtype=dtype,
    controlnet=args.controlnet or None,
    t2i_adapter=args.t2i_adapter,
    revision=args.revision,
    variant=args.variant,
  )
  loaded = time.perf_counter()

  progress = []
  scheduler = args.scheduler or default_sampler(models.scheduler_config)
  pipe = IPAdapterPipeline(models, scheduler=scheduler, on_step=lambda i: progress[0].update(1))
  request = dict(
    adapters=adapters,
    negative_prompt=args.negative_prompt,
    guidance_scale=args.guidance_scale,
    num_inference_steps=args.num_inference_steps,
    eta=args.eta,
    num_samples=args.num_samples,
    seed=args.seed,
    latents=latents,
    height=args.height,
    width=args.width,
    **conditions,
  )
  try:  # the request checked against the model, before anything is written
    _, inputs = pipe.prepare(args.prompt, **request)
  except ValueError as e:  # flags this model cannot run: a usage error too
    raise UsageError(str(e)) from e
  steps = args.num_inference_steps - int(inputs.start)
  if args.save_image_embeds:
    if adapters is None:
      raise ValueError("--save_image_embeds needs --ip_adapter and --image")
    with storage.staged(args.save_image_embeds) as local:
      save_image_embeds(
        local,
        pipe.image_embeds(adapters),
        [m.adapter_config.image_features for m in models.adapters()],
      )
  pipe.compile(prompt=args.prompt, **request)
  compiled = time.perf_counter()
  with tqdm(total=steps, desc="sampling", unit="step", file=sys.stderr) as bar:
    progress.append(bar)
    images = pipe(args.prompt, output_type="np", **request).images
  done = time.perf_counter()

  from PIL import Image

  image_format = Image.registered_extensions()[os.path.splitext(args.out)[1].lower()]
  image_files = _image_paths(args)
  for path, image in zip(image_files, pil_images(images)):
    storage.write_bytes(path, _encoded(image, image_format))
  storage.write_bytes(args.out, _encoded(image_grid(images), image_format))
  if args.save_array:
    array = io.BytesIO()
    np.save(array, images.astype(np.float32))
    storage.write_bytes(_array_path(args.save_array), array.getvalue())
  settings = dict(vars(args))
  settings.update(
    image_files=image_files,
    height=int(images.shape[1]),
    width=int(images.shape[2]),
    scale=[p.scale for p in adapters or ()],
    scheduler=scheduler,
    seconds_loading=round(loaded - start, 3),
    seconds_compiling=round(compiled - loaded, 3),
    seconds_per_image=round((done - compiled) / args.num_samples, 3),
  )
  storage.write_text(_settings_path(args.out), json.dumps(settings, indent=2))
  if not storage.exists(args.out):
    raise OSError(f"--out {args.out}: not found after writing it")
  beside = f"; each image also as {image_files[0]}, ..." if image_files else ""
  print(
    f"wrote {args.out} ({args.num_samples} images {images.shape[1]}x{images.shape[2]}, "
    f"{settings['seconds_per_image']} s per image after {settings['seconds_compiling']} s "
    f"of compilation{beside})"
  )
  return settings


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return run_command(lambda: sample_from_flags(args))


if __name__ == "__main__":
  sys.exit(main())
