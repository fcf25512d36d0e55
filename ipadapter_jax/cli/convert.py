"""Convert IP-Adapter and Stable Diffusion weights between the PyTorch world and this project.

  ipadapter-jax convert inspect ip-adapter_sd15.safetensors
  ipadapter-jax convert to-jax ip-adapter_sd15.bin --unet SD_FOLDER --out adapter_ckpt
  ipadapter-jax convert to-official adapter_ckpt --out my-adapter.safetensors --bin
  ipadapter-jax convert to-official RUN_WORKDIR --step 4000 --out step4000.safetensors
  ipadapter-jax convert to-diffusers SD_FOLDER --out exported_sd --dtype float16

An --out folder must be new, empty, or the same command's earlier output (its .ipadapter_jax
marker lists what it wrote); an existing --out file is replaced only with --overwrite. Outputs
may be gs:// or s3:// URIs.
"""

from __future__ import annotations

import argparse
import sys

import ml_dtypes
import numpy as np
from flax import nnx

from ipadapter_jax import storage
from ipadapter_jax.cli.common import Parser, run_command
from ipadapter_jax.weights.adapter_checkpoint import EXPORT_DTYPE

DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


# What each writer's marker names: only the same command replaces an output folder.
TO_JAX = "ipadapter-jax convert to-jax"
TO_OFFICIAL = "ipadapter-jax convert to-official"
TO_DIFFUSERS = "ipadapter-jax convert to-diffusers"


def _size(path: str) -> str:
  return f"{storage.size(path) / 1e6:.1f} MB"


def _abstract_unet(unet_path: str, adapter):
  from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
  from ipadapter_jax.weights.folders import read_config, resolve_subfolder

  folder = resolve_subfolder(unet_path, "unet")
  config = UNetConfig.from_diffusers(read_config(folder), source=f"{folder}/config.json")
  return nnx.eval_shape(lambda: UNet2DConditionModel(config, adapter=adapter, rngs=nnx.Rngs(0)))


def cmd_inspect(args) -> str:
  from ipadapter_jax.weights.ip_adapter import check_fits, describe, read_ip_adapter

  info = describe(read_ip_adapter(args.file), args.file)
  if args.unet:
    check_fits(info, _abstract_unet(args.unet, info.adapter), args.file)
  fits = f"; fits {args.unet}" if args.unet else ""
  return f"{args.file}: {info.summary()}, {_size(args.file)}{fits}"


def cmd_to_jax(args) -> str:
  from ipadapter_jax.weights.adapter_checkpoint import save_adapter_checkpoint
  from ipadapter_jax.weights.ip_adapter import describe, load_ip_adapter, read_ip_adapter

  out = storage.check_output(args.out, TO_JAX)  # before anything is read
  state = read_ip_adapter(args.file)
  info = describe(state, args.file)
  model = _abstract_unet(args.unet, info.adapter)
  load_ip_adapter(model, state, source=args.file)
  with storage.staged(out, TO_JAX) as local:  # remote: uploaded whole, once written here
    save_adapter_checkpoint(model, local)
  return f"wrote {out}: {info.summary()}, {_size(out)}"


def cmd_to_official(args) -> str:
  from ipadapter_jax.weights.adapter_checkpoint import abstract_unet_for, load_adapter_checkpoint
  from ipadapter_jax.weights.ip_adapter import describe, ip_adapter_state_dict, save_ip_adapter

  if not args.out.endswith(".safetensors"):
    raise ValueError(f"--out must end with .safetensors (got {args.out}); --bin adds the .bin")
  checks = dict(folder=False, overwrite=args.overwrite)
  outputs = [
    storage.check_output(p, TO_OFFICIAL, **checks)
    for p in ([args.out[: -len(".safetensors")] + ".bin"] if args.bin else []) + [args.out]
  ]
  storage.check_path(args.checkpoint, "checkpoint")
  model = abstract_unet_for(args.checkpoint)
  source = load_adapter_checkpoint(model, args.checkpoint, step=args.step)
  dtype = DTYPES[args.dtype]
  info = describe(ip_adapter_state_dict(model, dtype))
  # The .bin (which needs torch) first; each file appears only when complete, and a failure
  # of the second removes the first, so a run leaves both files or neither.
  written = []
  try:
    for path in outputs:
      with storage.staged(path, TO_OFFICIAL, **checks) as local:
        save_ip_adapter(model, local, dtype=dtype)
      written.append(path)
  except BaseException:
    for path in written:
      storage.remove(path)
    raise
  return "\n".join(f"wrote {p}: {info.summary()}, {_size(p)} ({source})" for p in outputs)


def cmd_to_diffusers(args) -> str:
  from ipadapter_jax.weights.stable_diffusion import load_stable_diffusion, save_stable_diffusion

  out = storage.check_output(args.out, TO_DIFFUSERS)  # before the model is loaded
  sd = load_stable_diffusion(args.pretrained, variant=args.variant)
  with storage.staged(out, TO_DIFFUSERS) as local:
    save_stable_diffusion(sd, local, dtype=DTYPES[args.dtype] if args.dtype else None)
  kind = "SDXL" if sd.is_sdxl else "Stable Diffusion"
  return f"wrote {out}: {kind} pipeline (unet, vae, text encoders, tokenizers), {_size(out)}"


def build_parser() -> argparse.ArgumentParser:
  parser = Parser(
    prog="ipadapter-jax convert",
    description="Convert IP-Adapter weights between the official PyTorch files (as released "
    "in h94/IP-Adapter and loaded by diffusers, ComfyUI and the official "
    "IPAdapter classes) and this project's JAX checkpoints; export Stable "
    "Diffusion models to diffusers folders.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="Adapter variants (basic, plus, full_face), token count, embedding width and "
    "layer count are read from the file itself; nothing is guessed.",
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser(
    "inspect",
    help="show what an official IP-Adapter file holds",
    description="Print the variant, tokens, widths, layer count, parameter "
    "count and dtype of an official IP-Adapter file.",
  )
  p.add_argument("file", help="ip-adapter*.bin or .safetensors")
  p.add_argument(
    "--unet",
    help="also check that it fits this UNet (diffusers unet/ or "
    "pipeline folder; only config.json is read)",
  )
  p.set_defaults(run=cmd_inspect)

  p = sub.add_parser(
    "to-jax",
    help="official file -> JAX adapter checkpoint (Orbax)",
    description="Convert an official IP-Adapter file into a JAX adapter "
    "checkpoint that training and sampling here can start from.",
  )
  p.add_argument("file", help="ip-adapter*.bin or .safetensors")
  p.add_argument(
    "--unet",
    required=True,
    help="the Stable Diffusion model it belongs to "
    "(pipeline or unet/ folder; only config.json is read)",
  )
  p.add_argument(
    "--out",
    required=True,
    help="output folder: new, empty or an earlier to-jax output (written only on success)",
  )
  p.set_defaults(run=cmd_to_jax)

  p = sub.add_parser(
    "to-official",
    help="JAX adapter checkpoint -> official file(s)",
    description="Write an adapter trained here in the official format, "
    "loadable by diffusers' load_ip_adapter, ComfyUI and the "
    "official IPAdapter classes. From a training run: what the "
    "run exports (the EMA when it keeps one) at a checkpoint step.",
  )
  p.add_argument("checkpoint", help="a to-jax output folder, or a training run's work directory")
  p.add_argument(
    "--step",
    type=int,
    default=None,
    help="a training run's checkpoint step (default: its latest finalized one)",
  )
  p.add_argument("--out", required=True, help="output .safetensors path")
  p.add_argument("--bin", action="store_true", help="also write the .bin (torch pickle) beside it")
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing --out file (and .bin); without it they are refused",
  )
  p.add_argument(
    "--dtype",
    choices=sorted(DTYPES),
    default=EXPORT_DTYPE,
    help=f"weight dtype of the file (default {EXPORT_DTYPE}, as a training run "
    "exports it; float16 halves the file, as released files are)",
  )
  p.set_defaults(run=cmd_to_official)

  p = sub.add_parser(
    "to-diffusers",
    help="Stable Diffusion models -> diffusers folder",
    description="Load a Stable Diffusion pipeline (folder or hub id) into JAX "
    "and write its UNet, VAE, text encoders, tokenizers and "
    "scheduler config back as a diffusers folder.",
  )
  p.add_argument("pretrained", help="diffusers pipeline folder or hub id")
  p.add_argument(
    "--out",
    required=True,
    help="output folder: new, empty or an earlier to-diffusers output (written only on success)",
  )
  p.add_argument(
    "--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep float32)"
  )
  p.add_argument("--variant", default=None, help="read weights of this variant (e.g. fp16)")
  p.set_defaults(run=cmd_to_diffusers)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return run_command(lambda: print(args.run(args)))


if __name__ == "__main__":
  sys.exit(main())
