r"""The tpu-compile command: real-size adapter training and sampling compiled for TPU topologies,
on any host: libtpu's compiler reports per-chip memory, FLOPs and collectives before anyone rents
the pod.

  pip install "ipadapter_jax[tpu]"
  ipadapter-jax tpu-compile --model sd15 --topology v5e-8 --program train --batch 8
  ipadapter-jax tpu-compile --model sd15 --topology v5e-8 --program train --batch 8 --fit
  ipadapter-jax tpu-compile --model sd15 --topology v5e-8 --program sample --batch 4
  ipadapter-jax tpu-compile --results rows.json --table   # every row in rows.json, as markdown

Each run prints its row (JSON, then as a table row); with --results FILE it is also appended to
that JSON list (benchmarks/tpu_compile.py keeps the repository's rows in benchmarks/). The train
step is the loop's (`train/program.py`): the frozen bf16 UNet, the float32 adapter and AdamW
state, an embedding-cache batch, the recipe's run config (the registered configs sd15 and sdxl:
their optimizer, dropout and noise settings) and the (data, fsdp) mesh and shardings it asks
for. `--fit` compiles a second batch size and extrapolates the memory line to the largest
per-chip batch that fits the chip's HBM. The roofline time is max(FLOPs / peak, bytes /
bandwidth) per chip (ipadapter_jax.chips' figures), with the FLOPs of the Mosaic attention
kernels (which XLA does not count) added from `compile_only.blocked_attention_flops`. Against
it, the products and convolutions of the same program traced with XLA's attention
(`compile_only.matmul_flops`): the arithmetic as written, without the compiler's cost model."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

from ipadapter_jax.chips import CHIPS, GIB
from ipadapter_jax.cli.common import Parser, run_command

# Slice name -> (topology, chips per host): libtpu's default host shape for v5e differs from
# the v5litepod-8 VM's single 8-chip host.
TOPOLOGIES = {
  "v5e-4": ("v5e:2x2", None),
  "v5e-8": ("v5e:2x4", (2, 4, 1)),
  "v4-8": ("v4:2x2x1", None),
  "v5p-8": ("v5p:2x2x1", None),
  "v5e-64": ("v5e:8x8", None),
  "v5p-64": ("v5p:4x4x2", None),
}


def models(name: str) -> dict:
  """The released architectures and the recipe config of `name` (sd15 or sdxl)."""
  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.configs import sd15_ip_adapter, sdxl_ip_adapter
  from ipadapter_jax.models import released

  common = dict(
    vae=released.SD_VAE,
    text=released.CLIP_L14_TEXT,
    vision=released.OPENCLIP_H14_VISION,
    embed=1024,
  )  # ViT-H image encoder
  if name == "sd15":
    return dict(common, unet=released.SD15_UNET, size=512, config=sd15_ip_adapter)
  return dict(
    common,
    unet=released.SDXL_UNET,
    size=1024,
    config=sdxl_ip_adapter,
    text_2=released.OPENCLIP_BIGG14_TEXT,
  )


def measure(args) -> dict:
  """Compiles the program `args` name for its slice; returns the row of figures."""
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np

  from ipadapter_jax.models.image_proj import AdapterConfig
  from ipadapter_jax.train import compile_only

  spec = models(args.model)
  topology, per_host = TOPOLOGIES[args.topology]
  try:
    mesh = compile_only.tpu_mesh(topology, args.fsdp, per_host)
  except RuntimeError as e:  # no libtpu: the install's problem, reported in one line
    raise ValueError(str(e)) from None
  chips = mesh.size
  chip = CHIPS[topology.split(":")[0]]
  peak, hbm, bandwidth = chip.peak_flops, chip.memory, chip.bandwidth
  latent = spec["size"] // 8
  cfg = spec["config"].get_config()  # the recipe's run config: its optimizer, dropout, noise
  cfg.optimizer.ema_decay = 0.9999 if args.ema else 0.0
  cfg.mesh.fsdp = args.fsdp
  cfg.mesh.shard_frozen = cfg.mesh.shard_trainable = args.fsdp > 1
  adapter = AdapterConfig(num_tokens=4, embed_dim=spec["embed"])
  # The compiled UNet's attention follows the target; the counted one uses XLA's einsums.
  unets = {
    counted: compile_only.abstract_unet(
      spec["unet"], adapter, remat=args.remat, attention_implementation="xla" if counted else None
    )
    for counted in (False, True)
  }

  def program(batch: int, counted: bool = False):
    """(jitted program, abstract arguments) at `batch` per chip. `counted`: to be traced for
    `compile_only.matmul_flops`, with XLA's attention in the UNet and the sampling program on
    this host's CPU, where the VAE's attention is not a Mosaic call either."""
    unet = unets[counted]
    if args.program == "train":
      return compile_only.train_step(unet, mesh, cfg, batch_size=batch * chips, latent_size=latent)
    networks = compile_only.abstract_networks(
      unet, spec["vae"], spec["text"], spec["vision"], spec.get("text_2")
    )
    plan, inputs = compile_only.sampling_request(
      networks, num_samples=batch * chips, size=spec["size"], steps=args.steps
    )
    devices = jax.devices("cpu")[:1] if counted else mesh.devices.flat
    return compile_only.sampling_program(networks, compile_only.data_mesh(devices), plan, inputs)

  def compiled_for(batch: int):
    start = time.perf_counter()
    jitted, arguments = program(batch)
    return jitted.lower(*arguments).compile(), time.perf_counter() - start

  compiled, seconds = compiled_for(args.batch)
  # The arithmetic as written, with no Mosaic call to hide FLOPs.
  jitted, arguments = program(args.batch, counted=True)
  traced = compile_only.matmul_flops(jax.make_jaxpr(jitted)(*arguments)) / chips
  r = compile_only.report(compiled)
  row = {
    "model": args.model,
    "program": args.program,
    "topology": args.topology,
    "chips": chips,
    "hosts": len({d.process_index for d in mesh.devices.flat}),
    "mesh": dict(mesh.shape),
    "batch_per_chip": args.batch,
    "remat": args.remat,
    "ema": args.ema,
    "compile_s": round(seconds, 1),
    "hbm_gib": hbm / GIB,
    "memory_gib": {k: v / GIB for k, v in r["memory"].items()},
    "fits": r["memory"]["total"] <= hbm,
    "xla_flops": r["flops"],
    "matmul_flops": traced,
    "bytes_accessed": r["bytes_accessed"],
    "collectives": r["collectives"],
    "mosaic_kernels": r["mosaic_kernels"],
  }
  attention = compile_only.blocked_attention_flops(unets[False], latent, args.batch)
  if args.program == "train":
    row["attention_flops"] = 3 * attention
    flops = r["flops"] + row["attention_flops"]
    roofline = max(flops / peak, r["bytes_accessed"] / bandwidth)
    row.update(flops=flops, roofline_s=roofline, images_per_s_per_chip=args.batch / roofline)
  else:  # the loop body is compiled once: per step, the CFG batch of 2 x batch images
    row["steps"] = args.steps
    row["attention_flops_per_step"] = 2 * attention
  if args.fit:
    second, _ = compiled_for(2 * args.batch)
    total = [r["memory"]["total"], compile_only.report(second)["memory"]["total"]]
    per_example = (total[1] - total[0]) / args.batch
    fixed = total[0] - per_example * args.batch
    row["memory_per_example_gib"] = per_example / GIB
    row["largest_batch_per_chip"] = int(np.floor((hbm - fixed) / per_example))
  row.update(
    host=platform.processor() or platform.machine(),
    cpus=os.cpu_count(),
    jax=jax.__version__,
    date=datetime.date.today().isoformat(),
  )
  return row


def latest(rows: list[dict]) -> list[dict]:
  """The last row measured of each setting, in the order the settings were first measured."""
  key = lambda r: tuple(
    str(r[k]) for k in ("model", "program", "topology", "mesh", "batch_per_chip", "remat", "ema")
  )
  last = {key(r): r for r in rows}
  return list({key(r): last[key(r)] for r in rows}.values())


def table(rows: list[dict]) -> str:
  """The rows as a markdown table."""
  lines = [
    "| model | program | slice (chips, hosts) | mesh | batch/chip | remat | memory/chip "
    "(GiB: args + temp = total of HBM) | fits | largest batch | TFLOP/chip: XLA (+ "
    "Mosaic attention) (traced products) | roofline s | img/s/chip | collectives | "
    "Mosaic | compile s |",
    "|" + "---|" * 15,
  ]
  for r in rows:
    m = r["memory_gib"]
    coll = (
      ", ".join(
        f"{k} {v['count']}x {v['bytes'] / 2**20:.1f} MiB"
        for k, v in sorted(r["collectives"].items())
      )
      or "none"
    )
    if r["program"] == "train":
      flops = f"{r['xla_flops'] / 1e12:.2f} + {r['attention_flops'] / 1e12:.2f}"
      flops += f" ({r['matmul_flops'] / 1e12:.2f})" if "matmul_flops" in r else ""
    else:  # XLA counts the denoising loop's body once; the traced count has every step
      flops = f"{r['xla_flops'] / 1e12:.2f}, loop body once"
      flops += (
        f" ({r['matmul_flops'] / 1e12:.2f}, {r['steps']} steps)" if "matmul_flops" in r else ""
      )
    mesh = " x ".join(f"{axis} {size}" for axis, size in r["mesh"].items())
    roofline = (
      f"{r['roofline_s']:.3f} | {r['images_per_s_per_chip']:.1f}" if "roofline_s" in r else "- | -"
    )
    lines.append(
      f"| {r['model']} | {r['program']} | {r['topology']} ({r['chips']}, {r['hosts']}) | "
      f"{mesh} | {r['batch_per_chip']} | {r['remat']} | {m['argument']:.2f} + "
      f"{m['temp']:.2f} = {m['total']:.2f} of {r['hbm_gib']:.0f} | "
      f"{'yes' if r['fits'] else 'no'} | {r.get('largest_batch_per_chip', '-')} | {flops} | "
      f"{roofline} | {coll} | {r['mosaic_kernels']} | {r['compile_s']:.0f} |"
    )
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  p = Parser(prog="ipadapter-jax tpu-compile", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="sd15", choices=("sd15", "sdxl"))
  p.add_argument("--program", default="train", choices=("train", "sample"))
  p.add_argument("--topology", default="v5e-8", choices=sorted(TOPOLOGIES))
  p.add_argument("--batch", type=int, default=8, help="examples (train) or images per chip")
  p.add_argument("--fsdp", type=int, default=1, help="the mesh's fsdp axis (weights sharded)")
  p.add_argument("--remat", default="none", choices=("none", "dots", "full"))
  p.add_argument("--ema", action="store_true", help="keep an EMA of the adapter")
  p.add_argument("--steps", type=int, default=50, help="sampling steps (program sample)")
  p.add_argument("--fit", action="store_true", help="also compile 2x the batch: largest batch")
  p.add_argument(
    "--results",
    default=None,
    metavar="FILE",
    help="a JSON list of rows: the row is appended to it (created if missing)",
  )
  p.add_argument(
    "--table",
    action="store_true",
    help="print the latest row of each setting in --results as markdown, and stop",
  )
  return p


def _read_rows(path: str | None) -> list[dict]:
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    rows = json.load(f)
  if not isinstance(rows, list):
    raise ValueError(f"--results {path}: not a JSON list of rows")
  return rows


def compile_command(args) -> None:
  """Measures one row (or prints the table) as the parsed flags say."""
  rows = _read_rows(args.results)
  if args.table:
    print(table(latest(rows)))
    return
  # Compile-only: no TPU is probed, and libtpu is told it runs on no TPU VM.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  row = measure(args)
  print(json.dumps(row, indent=1))
  if args.results:
    with open(args.results, "w") as f:
      json.dump([*rows, row], f, indent=1)
  print(table([row]))


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.table and not args.results:
    parser.error("--table needs --results FILE (the rows to show)")
  return run_command(lambda: compile_command(args))


if __name__ == "__main__":
  sys.exit(main())
