"""Input throughput per host (examples/s) of every source format, beside what a TPU step needs.

  python benchmarks/input_pipeline.py [--num_images 256] [--resolutions 512] \
      [--batch_size 32] [--batches 12] [--worker_counts 0] [--threads N] [--shards 4] \
      [--out input_pipeline.json]

The same generated photo-like JPEGs (512 to 768 px a side, about what LAION/COYO images are at
this resolution) are read as an imagefolder (metadata.jsonl + files), as webdataset tar shards,
and as a built ArrayRecord dataset: decoded, resized and cropped for the VAE, preprocessed for
CLIP (224) and tokenized (77 tokens). The embedding cache is records with SD1.5's shapes (latent
moments at resolution/8, a 1024 image embedding, 77x768 text states), float32 and bfloat16.
Batches land on all local devices along "data".

The last line is what one host of a v5e-64 slice must deliver to keep its chips busy: the
global batch over the step's roofline time over the 16 hosts (benchmarks/tpu_compile.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from ipadapter_jax.data.batches import make_train_iterator
from ipadapter_jax.data.cache_files import example_bytes, write_examples
from ipadapter_jax.data.image_text import build_image_text_dataset
from ipadapter_jax.data.input_pipeline import DataSpec, open_source
from ipadapter_jax.preprocessing import CLIPImageConfig
from ipadapter_jax.tokenizer import load_tokenizer, write_word_tokenizer

WORDS = [
  "a",
  "photo",
  "of",
  "red",
  "green",
  "blue",
  "cat",
  "dog",
  "on",
  "the",
  "beach",
  "at",
  "night",
  "painting",
  "city",
  "street",
]
SIZES = [(512, 768), (768, 512), (640, 640), (576, 704), (704, 576), (512, 512)]
TPU_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_compile.json")


def _photo(rng, height: int, width: int) -> bytes:
  """A JPEG with smooth structure and some noise (compresses like a photo, not like noise)."""
  blocks = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  base = np.asarray(Image.fromarray(blocks).resize((width, height), Image.Resampling.BICUBIC))
  noise = rng.integers(-6, 7, (height, width, 3))
  pixels = np.clip(base.astype(np.int32) + noise, 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
  return buffer.getvalue()


def make_images(folder: str, count: int, seed: int = 0, sizes=None) -> str:
  """`count` JPEGs, an imagefolder's metadata.jsonl and the official JSON Lines annotation file
  (data.jsonl) over them; returns the annotation file's path."""
  rng = np.random.default_rng(seed)
  sizes = sizes or [(480, 640), (640, 480)]
  rows = []
  for i in range(count):
    height, width = sizes[i % len(sizes)]
    name = f"{i:05d}.jpg"
    with open(os.path.join(folder, name), "wb") as f:
      f.write(_photo(rng, height, width))
    caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
    rows.append({"file_name": name, "text": caption})
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  path = os.path.join(folder, "data.jsonl")
  with open(path, "w") as f:
    f.write(
      "".join(json.dumps({"image_file": r["file_name"], "text": r["text"]}) + "\n" for r in rows)
    )
  return path


def write_shards(folder: str, images: str, num_shards: int) -> str:
  """The imagefolder's images and captions as webdataset shards (KEY.jpg, KEY.txt)."""
  os.makedirs(folder)
  with open(os.path.join(images, "metadata.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  per_shard = -(-len(rows) // num_shards)
  for s in range(num_shards):
    with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
      for row in rows[s * per_shard : (s + 1) * per_shard]:
        key = row["file_name"].removesuffix(".jpg")
        with open(os.path.join(images, row["file_name"]), "rb") as f:
          members = {"jpg": f.read(), "txt": row["text"].encode()}
        for ext, data in members.items():
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size, info.mtime = len(data), time.time()
          tar.addfile(info, io.BytesIO(data))
  return folder


def sd15_shapes(resolution: int) -> dict[str, tuple[int, ...]]:
  r = resolution // 8
  return {
    "latent_mean": (r, r, 4),
    "latent_logvar": (r, r, 4),
    "image_embeds": (1024,),
    "text_context": (77, 768),
    "time_ids": (6,),
  }


def sd15_cache(
  out_dir: str, count: int, resolution: int, seed: int = 0, dtype: str = "float32"
) -> str:
  """An embedding cache of random records with SD1.5's shapes at `resolution`; its folder."""
  shapes = sd15_shapes(resolution)
  rng = np.random.default_rng(seed)
  examples = (
    {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()} for _ in range(count)
  )
  return write_examples(
    os.path.join(out_dir, f"cache_{resolution}_{dtype}"),
    examples,
    shapes,
    dtype=dtype,
    settings={"resolution": resolution},
    empty_text={"text_context": np.zeros((77, 768), np.float32)},
  )


def throughput(
  source, spec: DataSpec, *, batch_size: int, batches: int, worker_count: int, threads: int | None
) -> float:
  """Examples per second over `batches` global batches, after one warm-up batch."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  it = make_train_iterator(
    source,
    spec,
    global_batch_size=batch_size,
    mesh=mesh,
    seed=0,
    worker_count=worker_count,
    num_threads=threads,
    shuffle_buffer=64,
  )
  jax.block_until_ready(next(it))
  start = time.perf_counter()
  for _ in range(batches):
    jax.block_until_ready(next(it))
  elapsed = time.perf_counter() - start
  it.close()
  return batches * batch_size / elapsed


def tpu_need(topology: str = "v5e-64", model: str = "sd15") -> dict | None:
  """Examples/s per host that the compiled train step of `topology` consumes at its roofline."""
  if not os.path.isfile(TPU_TABLE):
    return None
  with open(TPU_TABLE) as f:
    rows = [
      r
      for r in json.load(f)
      if r["model"] == model
      and r["program"] == "train"
      and r["topology"] == topology
      and r.get("roofline_s")
    ]
  if not rows:
    return None
  row = rows[-1]
  batch = row["batch_per_chip"] * row["chips"]
  return {
    "topology": topology,
    "global_batch": batch,
    "step_s": row["roofline_s"],
    "hosts": row["hosts"],
    "per_host": batch / row["roofline_s"] / row["hosts"],
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--resolutions", type=int, nargs="+", default=[512])
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument(
    "--worker_counts",
    type=int,
    nargs="+",
    default=[0],
    help="worker processes per run (0: threads in the training process)",
  )
  parser.add_argument("--threads", type=int, default=None, help="reading threads per process")
  parser.add_argument("--shards", type=int, default=4, help="webdataset shards")
  parser.add_argument(
    "--formats", nargs="+", default=["imagefolder", "webdataset", "arrayrecord", "cache"]
  )
  parser.add_argument("--out", help="also write the rows here as JSON")
  args = parser.parse_args(argv)
  print(
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
    f"{jax.device_count()} {jax.devices()[0].platform} device(s), batch {args.batch_size}, "
    f"{args.batches} batches after one warm-up"
  )
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    images = os.path.join(tmp, "images")
    os.makedirs(images)
    start = time.perf_counter()
    annotations = make_images(images, args.num_images, sizes=SIZES)
    jpeg_kib = (
      np.mean(
        [os.path.getsize(os.path.join(images, n)) for n in os.listdir(images) if n.endswith(".jpg")]
      )
      / 1024
    )
    sources = {
      "imagefolder": lambda: open_source(images),
      "webdataset": lambda: open_source(
        write_shards(os.path.join(tmp, "shards"), images, args.shards)
      ),
    }
    if "arrayrecord" in args.formats:
      report = build_image_text_dataset(annotations, images, os.path.join(tmp, "datasets"))
      sources["arrayrecord"] = lambda: open_source(report.dataset_dir)
    print(
      f"{args.num_images} JPEGs of 512-768 px, {jpeg_kib:.0f} KiB on average, written "
      f"{'and built ' if 'arrayrecord' in args.formats else ''}in "
      f"{time.perf_counter() - start:.1f} s"
    )
    write_word_tokenizer(os.path.join(tmp, "tokenizer"), WORDS)
    tokenizer = load_tokenizer(os.path.join(tmp, "tokenizer"))
    kw = dict(batch_size=args.batch_size, batches=args.batches, threads=args.threads)
    for resolution in args.resolutions:
      spec = DataSpec(
        resolution=resolution, random_crop=False, clip=CLIPImageConfig(), tokenizer=tokenizer
      )
      for name in [f for f in args.formats if f in sources]:
        source = sources[name]()
        for workers in args.worker_counts:
          rate = throughput(source, spec, worker_count=workers, **kw)
          rows.append(
            dict(format=name, resolution=resolution, worker_count=workers, examples_per_s=rate)
          )
          print(f"{name:12s} {resolution:4d} px, worker_count={workers}: {rate:8.1f} examples/s")
      if "cache" in args.formats:
        for dtype in ("float32", "bfloat16"):
          cache = open_source(
            sd15_cache(os.path.join(tmp, "caches"), args.num_images, resolution, dtype=dtype)
          )
          rate = throughput(cache, spec, worker_count=0, **kw)
          size = example_bytes(sd15_shapes(resolution), dtype)
          rows.append(
            dict(
              format=f"cache {dtype}",
              resolution=resolution,
              worker_count=0,
              examples_per_s=rate,
              bytes_per_example=size,
            )
          )
          print(
            f"cache {dtype:8s} {resolution:4d} px ({size / 1024:.1f} KiB an example): "
            f"{rate:8.1f} examples/s"
          )
  need = tpu_need()
  if need:
    print(
      f"{need['topology']} SD1.5 step: global batch {need['global_batch']} in "
      f"{need['step_s']:.3f} s (roofline) over {need['hosts']} hosts = "
      f"{need['per_host']:.0f} examples/s per host"
    )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(
        {"rows": rows, "tpu_need": need, "cpus": os.cpu_count(), "jpeg_kib": jpeg_kib}, f, indent=1
      )


if __name__ == "__main__":
  main()
