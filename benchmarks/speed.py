r"""This project against diffusers PyTorch, in one run, on the same weights and work.

  python benchmarks/speed.py --config sd15-small                       # the pinned comparison
  python benchmarks/speed.py --config sd15 --dtype bfloat16 --torch_compile --train_batch 8

Measures, for JAX and PyTorch: the UNet forward on a classifier-free-guidance batch; the adapter
train step (forward + backward + AdamW, frozen base); the whole sampling loop (text and image
encoders, N DDIM steps with CFG, the VAE decode) per image; and, for JAX, XLA's FLOP count,
achieved FLOP/s and MFU (accelerators), XLA's memory estimate for the train step under each remat
policy, time to the first image in a fresh process with a cold and a warm persistent compilation
cache, and the input pipeline. Every time is the median of repeated runs after warm-up, with
`block_until_ready` (JAX) and `cuda.synchronize` (PyTorch). Prints a Markdown table; --out writes
JSON.

Both sides load one diffusers pipeline folder written here from a random (seeded) diffusers model
with small CLIP encoders, plus one adapter file, so the work is identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

STARTED = time.perf_counter()  # for --first_image: the process start, before JAX is imported

SD15_BLOCKS = dict(
  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


@dataclasses.dataclass(frozen=True)
class Bench:
  unet: dict
  vae: dict
  latent_size: int
  image_embed_dim: int
  forward_batch: int  # the UNet's batch: CFG doubles the samples
  train_batch: int
  samples: int  # images per sampling call
  steps: int  # DDIM steps

  @property
  def image_size(self) -> int:
    return self.latent_size * 2 ** (len(self.vae["block_out_channels"]) - 1)


SMALL_VAE = dict(
  block_out_channels=(32, 64, 64, 64),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=32,
  down_block_types=("DownEncoderBlock2D",) * 4,
  up_block_types=("UpDecoderBlock2D",) * 4,
)
SD_VAE = dict(
  block_out_channels=(128, 256, 512, 512),
  layers_per_block=2,
  latent_channels=4,
  norm_num_groups=32,
  down_block_types=("DownEncoderBlock2D",) * 4,
  up_block_types=("UpDecoderBlock2D",) * 4,
)
CONFIGS = {
  # The script's own smoke test (tests/test_benchmarks.py), not a measurement.
  "tiny": Bench(
    dict(
      block_out_channels=(32, 64),
      layers_per_block=1,
      attention_head_dim=2,
      cross_attention_dim=32,
      norm_num_groups=8,
      sample_size=8,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    dict(
      block_out_channels=(8, 8),
      layers_per_block=1,
      latent_channels=4,
      norm_num_groups=8,
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2,
    ),
    8,
    16,
    forward_batch=2,
    train_batch=2,
    samples=1,
    steps=2,
  ),
  # Pinned so that results compare across time: 41,356,484 UNet parameters.
  "sd15-small": Bench(
    dict(
      SD15_BLOCKS,
      block_out_channels=(64, 128, 256, 256),
      layers_per_block=2,
      attention_head_dim=8,
      cross_attention_dim=768,
      sample_size=32,
    ),
    SMALL_VAE,
    32,
    1024,
    forward_batch=4,
    train_batch=2,
    samples=2,
    steps=20,
  ),
  "sd15": Bench(
    dict(
      SD15_BLOCKS,
      block_out_channels=(320, 640, 1280, 1280),
      layers_per_block=2,
      attention_head_dim=8,
      cross_attention_dim=768,
      sample_size=64,
    ),
    SD_VAE,
    64,
    1024,
    forward_batch=4,
    train_batch=8,
    samples=2,
    steps=50,
  ),
}
PEAK_FLOPS = {  # dense bf16 tensor-core peaks (FLOP/s) for MFU
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
}
WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "on", "the", "beach")
PROMPT = "a photo of a red cat on the beach"


def median_time(fn, repeats: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# ----- The shared weights ------------------------------------------------------------------------


def write_models(bench: Bench, folder: str) -> dict:
  """A diffusers pipeline folder (seeded random weights, small CLIP encoders), an image encoder
  folder, an adapter file and a prompt image; returns their paths."""
  import numpy as np
  import torch
  from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
  from PIL import Image
  from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
  )

  from ipadapter_jax.models.image_proj import AdapterConfig
  from ipadapter_jax.tokenizer import write_word_tokenizer
  from ipadapter_jax.weights import load_unet, save_ip_adapter

  torch.manual_seed(0)
  context = bench.unet["cross_attention_dim"]
  write_word_tokenizer(os.path.join(folder, "words"), WORDS, model_max_length=77)
  pipe = StableDiffusionPipeline(
    vae=AutoencoderKL(**bench.vae),
    unet=UNet2DConditionModel(**bench.unet),
    text_encoder=CLIPTextModel(
      CLIPTextConfig(
        vocab_size=200,
        hidden_size=context,
        intermediate_size=4 * context,
        num_hidden_layers=2,
        num_attention_heads=8,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
      )
    ),
    tokenizer=CLIPTokenizer.from_pretrained(os.path.join(folder, "words")),
    scheduler=DDIMScheduler(
      beta_start=0.00085,
      beta_end=0.012,
      beta_schedule="scaled_linear",
      clip_sample=False,
      set_alpha_to_one=False,
      steps_offset=1,
    ),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipe.save_pretrained(os.path.join(folder, "sd"))
  encoder = CLIPVisionModelWithProjection(
    CLIPVisionConfig(
      hidden_size=256,
      intermediate_size=1024,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=224,
      patch_size=32,
      projection_dim=bench.image_embed_dim,
    )
  )
  encoder.save_pretrained(os.path.join(folder, "image_encoder"))
  CLIPImageProcessor().save_pretrained(os.path.join(folder, "image_encoder"))
  unet = load_unet(
    os.path.join(folder, "sd", "unet"),
    adapter=AdapterConfig(num_tokens=4, embed_dim=bench.image_embed_dim),
  )
  save_ip_adapter(unet, os.path.join(folder, "ip_adapter.safetensors"), dtype=np.float32)
  image = os.path.join(folder, "prompt.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)).save(image)
  return {
    "sd": os.path.join(folder, "sd"),
    "image_encoder": os.path.join(folder, "image_encoder"),
    "adapter": os.path.join(folder, "ip_adapter.safetensors"),
    "image": image,
  }


# ----- JAX -----------------------------------------------------------------------------------


def jax_measurements(bench: Bench, paths: dict, args) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from PIL import Image

  from ipadapter_jax.configs import sd15_ip_adapter
  from ipadapter_jax.generation.pipeline import IPAdapterPipeline
  from ipadapter_jax.models.layers import AdapterParam
  from ipadapter_jax.models.networks import Networks
  from ipadapter_jax.models.vae import VAEConfig
  from ipadapter_jax.train.loading import denoising_spec
  from ipadapter_jax.train.program import program_from_config
  from ipadapter_jax.train.sharding import make_mesh
  from ipadapter_jax.weights import load_stable_diffusion

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  sd = load_stable_diffusion(
    paths["sd"],
    image_encoder=paths["image_encoder"],
    ip_adapter=paths["adapter"],
    dtype=dtype,
    param_dtype=dtype,
    attention_implementation=None if args.attention == "auto" else args.attention,
  )
  unet = sd.unet
  count = lambda f: int(sum(x.size for x in jax.tree.leaves(nnx.state(unet, f))))
  ip_layers = count(nnx.All(AdapterParam, nnx.Not(nnx.PathContains("image_proj"))))
  out = {
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "parameters": {
      "base_unet": count(nnx.All(nnx.Param, nnx.Not(AdapterParam))),
      "to_k_ip_to_v_ip": ip_layers,
      "image_proj": count(AdapterParam) - ip_layers,
    },
  }
  rng = jax.random.key(0)
  B, S, D, E = bench.forward_batch, 77, bench.unet["cross_attention_dim"], bench.image_embed_dim
  latents = jax.random.normal(rng, (B, bench.latent_size, bench.latent_size, 4), dtype)
  context = jax.random.normal(rng, (B, S, D), dtype)
  embeds = jax.random.normal(rng, (B, E), dtype)
  t = jnp.full((B,), 500)

  graphdef, weights = nnx.split(unet)
  weights = jax.tree.map(jnp.asarray, weights)  # new containers, detached from the live module
  forward = (
    jax.jit(lambda w, x, t, ctx, emb: nnx.merge(graphdef, w)(x, t, ctx, image_embeds=emb))
    .lower(weights, latents, t, context, embeds)
    .compile()
  )
  flops = (forward.cost_analysis() or {}).get("flops", float("nan"))
  out["forward_s"] = median_time(
    lambda: forward(weights, latents, t, context, embeds).block_until_ready(), args.repeats
  )
  out["forward_gflop"] = flops / 1e9

  # The adapter train step of train.py (built as the loop builds it, with the SD1.5 recipe's
  # optimizer), on one device and cached encoder outputs (the encoders are not timed).
  cfg = sd15_ip_adapter.get_config()
  mesh = make_mesh(1, 1, devices=jax.devices()[:1])

  def step_program(remat: str):
    unet.remat = remat
    spec = denoising_spec(cfg, sd.scheduler_config, unet.adapter_config, VAEConfig(), cached=True)
    program, params, frozen = program_from_config(cfg, Networks(unet=unet), spec, mesh)
    state = program.init_state(params)
    frozen = program.place_frozen(jax.tree.map(jnp.asarray, frozen))  # detached from the module
    Bt = bench.train_batch
    batch = {
      "text_context": context[:1].repeat(Bt, 0),
      "image_embeds": embeds[:1].repeat(Bt, 0),
      "latent_mean": latents[:1].repeat(Bt, 0).astype(jnp.float32),
      "latent_logvar": jnp.full((Bt,) + latents.shape[1:], -20.0),
    }
    empty = {"text_context": jnp.zeros((1, S, D), dtype), "image_features": jnp.zeros((E,))}
    compiled = program.step(batch).lower(state, frozen, batch, empty, rng).compile()
    return compiled, state, frozen, batch, empty

  remat = {}
  for policy in ("none", "dots", "full"):
    compiled, state, frozen, batch, empty = step_program(policy)
    memory = compiled.memory_analysis()
    holder = {"state": state}

    def run_step():
      holder["state"], metrics = compiled(holder["state"], frozen, batch, empty, rng)
      metrics["loss"].block_until_ready()

    seconds = median_time(run_step, args.repeats)
    remat[policy] = {
      "seconds": seconds,
      "temp_mib": getattr(memory, "temp_size_in_bytes", 0) / 2**20,
      "gflop": (compiled.cost_analysis() or {}).get("flops", float("nan")) / 1e9,
    }
  unet.remat = "none"
  out["train_step_s"] = remat["none"]["seconds"]
  out["train_gflop"] = remat["none"]["gflop"]
  # The step against a forward pass at its batch: about 2 (forward + activation backward) when
  # no weight gradient of the frozen UNet is computed, about 3 when one is.
  Bt = bench.train_batch
  forward_bt = (
    jax.jit(lambda w, x, t, ctx, emb: nnx.merge(graphdef, w)(x, t, ctx, image_embeds=emb))
    .lower(
      weights,
      latents[:1].repeat(Bt, 0),
      t[:1].repeat(Bt, 0),
      context[:1].repeat(Bt, 0),
      embeds[:1].repeat(Bt, 0),
    )
    .compile()
  )
  out["forward_train_batch_gflop"] = (forward_bt.cost_analysis() or {}).get(
    "flops", float("nan")
  ) / 1e9
  out["train_over_forward_flops"] = out["train_gflop"] / out["forward_train_batch_gflop"]
  out["remat"] = remat

  # The loop's read-back policy: a host sync after every step (reading the loss, as train.py did
  # before) against one read-back per interval of steps (what it does now).
  compiled, state, frozen, batch, empty = step_program("none")
  holder = {"state": state}

  def interval(sync_every_step: bool, steps: int = 10):
    outs = []
    for _ in range(steps):
      holder["state"], metrics = compiled(holder["state"], frozen, batch, empty, rng)
      outs.append(metrics)
      if sync_every_step:
        float(metrics["loss"])
    jax.device_get(outs)

  out["train_steps_per_s"] = {
    policy: 10 / median_time(lambda: interval(policy == "every_step"), max(1, args.repeats // 2))
    for policy in ("every_step", "per_interval")
  }

  pipe = IPAdapterPipeline(sd)
  image = Image.open(paths["image"])
  size = bench.image_size
  request = dict(
    num_inference_steps=bench.steps,
    num_samples=bench.samples,
    guidance_scale=7.5,
    height=size,
    width=size,
    output_type="np",
  )
  start = time.perf_counter()
  pipe(PROMPT, image, **request)
  out["sampling_first_call_s"] = time.perf_counter() - start
  out["sampling_per_image_s"] = (
    median_time(lambda: pipe(PROMPT, image, **request), max(1, args.repeats // 2), warmup=0)
    / bench.samples
  )
  compiles = pipe.cache_size()
  for scale, prompt, seed in ((0.3, "a dog", 1), (0.9, "", 2)):  # nothing recompiles
    pipe(prompt, image, scale=scale, seed=seed, **request)
  out["sampling_recompiled"] = pipe.cache_size() != compiles

  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    out["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device.device_kind), None)
    if peak:
      out["train_mfu"] = out["train_gflop"] * 1e9 / out["train_step_s"] / peak
      out["forward_mfu"] = out["forward_gflop"] * 1e9 / out["forward_s"] / peak
  return out


# ----- PyTorch -------------------------------------------------------------------------------


def torch_measurements(bench: Bench, paths: dict, args, compiled: bool) -> dict:
  import torch
  from diffusers import StableDiffusionPipeline
  from PIL import Image

  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  pipe = StableDiffusionPipeline.from_pretrained(paths["sd"], dtype=dtype).to(device)
  pipe.load_ip_adapter(
    os.path.dirname(paths["adapter"]),
    subfolder="",
    weight_name=os.path.basename(paths["adapter"]),
    image_encoder_folder=None,
  )
  from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

  pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
    paths["image_encoder"], dtype=dtype
  ).to(device)
  pipe.feature_extractor = CLIPImageProcessor.from_pretrained(paths["image_encoder"])
  unet = pipe.unet
  if compiled:
    unet = torch.compile(unet)
    pipe.unet = unet
  g = torch.Generator().manual_seed(0)
  B, S, D, E = bench.forward_batch, 77, bench.unet["cross_attention_dim"], bench.image_embed_dim
  shape = (B, 4, bench.latent_size, bench.latent_size)
  latents = torch.randn(shape, generator=g).to(device, dtype)
  context = torch.randn((B, S, D), generator=g).to(device, dtype)
  embeds = torch.randn((B, 1, E), generator=g).to(device, dtype)
  t = torch.full((B,), 500, device=device)
  out = {"torch": torch.__version__, "compiled": compiled}

  def forward():
    with torch.no_grad():
      unet(latents, t, context, added_cond_kwargs={"image_embeds": [embeds]})
    sync()

  out["forward_s"] = median_time(forward, args.repeats, warmup=2 if compiled else 1)

  trainable = [p for n, p in pipe.unet.named_parameters() if "encoder_hid_proj" in n or "_ip" in n]
  for p in pipe.unet.parameters():
    p.requires_grad_(False)
  for p in trainable:
    p.requires_grad_(True)
  optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
  Bt = bench.train_batch
  scheduler = pipe.scheduler

  def train_step():
    noise = torch.randn_like(latents[:Bt])
    steps = torch.randint(0, 1000, (Bt,), device=device)
    noisy = scheduler.add_noise(latents[:Bt], noise, steps)
    pred = unet(
      noisy, steps, context[:Bt], added_cond_kwargs={"image_embeds": [embeds[:Bt]]}
    ).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()

  out["train_step_s"] = median_time(train_step, args.repeats, warmup=2 if compiled else 1)
  for p in trainable:
    p.requires_grad_(False)

  image = Image.open(paths["image"])
  size = bench.image_size

  def sample():
    with torch.no_grad():
      pipe(
        PROMPT,
        ip_adapter_image=image,
        num_inference_steps=bench.steps,
        num_images_per_prompt=bench.samples,
        guidance_scale=7.5,
        height=size,
        width=size,
        output_type="np",
      )
    sync()

  out["sampling_per_image_s"] = median_time(sample, max(1, args.repeats // 2)) / bench.samples
  if device == "cuda":
    out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
  return out


# ----- Time to the first image -----------------------------------------------------------------


def first_image(paths: dict, bench: Bench) -> float:
  """In this fresh process: load, compile and sample one image; seconds since the start."""
  from PIL import Image

  from ipadapter_jax.generation.pipeline import IPAdapterPipeline
  from ipadapter_jax.weights import load_stable_diffusion

  pipe = IPAdapterPipeline(
    load_stable_diffusion(
      paths["sd"], image_encoder=paths["image_encoder"], ip_adapter=paths["adapter"]
    )
  )
  size = bench.image_size
  pipe(
    PROMPT,
    Image.open(paths["image"]),
    num_inference_steps=bench.steps,
    num_samples=1,
    height=size,
    width=size,
    output_type="np",
  )
  return time.perf_counter() - STARTED


def time_to_first_image(paths: dict, config: str) -> dict:
  cache = tempfile.mkdtemp(prefix="jax-cache-")
  env = dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  out = {}
  for name in ("cold_cache_s", "warm_cache_s"):
    result = subprocess.run(
      [sys.executable, __file__, "--config", config, "--first_image", json.dumps(paths)],
      env=env,
      capture_output=True,
      text=True,
      check=True,
    )
    out[name] = float(result.stdout.strip().splitlines()[-1])
  return out


# ----- Report --------------------------------------------------------------------------------


def table(result: dict) -> str:
  j, rows = result["jax"], []
  for name, key in (
    ("UNet forward (CFG batch)", "forward_s"),
    ("adapter train step", "train_step_s"),
    ("sampling loop, per image", "sampling_per_image_s"),
  ):
    line = f"| {name} | {j[key] * 1e3:.1f} ms"
    for side in ("torch", "torch_compile"):
      if side in result:
        t = result[side][key]
        line += f" | {t * 1e3:.1f} ms | {j[key] / t:.2f}"
    rows.append(line + " |")
  header = "| measurement | JAX | PyTorch | JAX / PyTorch |"
  if "torch_compile" in result:
    header += " torch.compile | JAX / compiled |"
  return "\n".join([header, "|" + "---|" * (header.count("|") - 1)] + rows)


def input_rates(bench: Bench, folder: str) -> dict:
  """Examples/s of the grain pipeline at this config's resolution, raw and from a cache
  (benchmarks/input_pipeline.py has the full version)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import input_pipeline as ip  # pylint: disable=import-outside-toplevel

  from ipadapter_jax.preprocessing import CLIPImageConfig
  from ipadapter_jax.tokenizer import load_tokenizer

  resolution, count = bench.image_size, 128
  images = os.path.join(folder, "images")
  os.makedirs(images)
  report = ip.build_image_text_dataset(
    ip.make_images(images, count), images, os.path.join(folder, "datasets")
  )
  spec = ip.DataSpec(
    resolution=resolution,
    random_crop=False,
    clip=CLIPImageConfig(),
    tokenizer=load_tokenizer(os.path.join(folder, "words")),
  )
  kw = dict(batch_size=32, batches=3, worker_count=0, threads=None)
  cache = ip.sd15_cache(os.path.join(folder, "caches"), count, resolution)
  return {
    "raw_examples_per_s": ip.throughput(ip.open_source(report.dataset_dir), spec, **kw),
    "cached_examples_per_s": ip.throughput(ip.open_source(cache), spec, **kw),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", choices=sorted(CONFIGS), default="sd15-small")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--train_batch", type=int, default=None)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--torch_compile", action="store_true", help="also PyTorch with torch.compile")
  p.add_argument(
    "--attention",
    choices=("auto", "xla", "chunked", "cudnn", "splash"),
    default="auto",
    help="JAX attention kernel (default: chosen per platform, "
    "ipadapter_jax/models/attention_kernels.py)",
  )
  p.add_argument("--skip_first_image", action="store_true")
  p.add_argument("--out", default=None, help="JSON results")
  p.add_argument("--first_image", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  bench = CONFIGS[args.config]
  if args.train_batch:
    bench = dataclasses.replace(bench, train_batch=args.train_batch)
  if args.first_image:
    print(first_image(json.loads(args.first_image), bench))
    return 0

  folder = tempfile.mkdtemp(prefix="speed-")
  paths = write_models(bench, folder)
  result = {
    "config": args.config,
    "dtype": args.dtype,
    "bench": dataclasses.asdict(bench),
    "date": time.strftime("%Y-%m-%d"),
    "machine": platform.processor() or platform.machine(),
    "cpus": os.cpu_count(),
  }
  result["jax"] = jax_measurements(bench, paths, args)
  result["torch"] = torch_measurements(bench, paths, args, compiled=False)
  if args.torch_compile:
    result["torch_compile"] = torch_measurements(bench, paths, args, compiled=True)
  if not args.skip_first_image:
    result["jax"]["first_image"] = time_to_first_image(paths, args.config)
  result["input_pipeline"] = input_rates(bench, folder)
  print(table(result))
  print(json.dumps(result, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
