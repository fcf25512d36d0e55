"""Input throughput (examples/s) of the grain pipeline, raw and cached, on a generated dataset.

  python benchmarks/input_pipeline.py [--num_images 256] [--resolutions 64 512] \
      [--batch_size 32] [--batches 16] [--worker_count 0] [--threads N]

Raw: JPEG photos-like images (640x480 and 480x640) decoded, resized and cropped for the VAE,
preprocessed for CLIP (224) and tokenized (77 tokens). Cached: records with SD1.5 shapes (latent
moments at resolution/8, a 1024 image embedding, 77x768 text states) written as an embedding
cache and read back. Batches land on all local devices along "data".
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from ipadapter_jax.data.cache import write_cache
from ipadapter_jax.data.image_text import build_image_text_dataset
from ipadapter_jax.data.input_pipeline import DataSpec, make_train_iterator, open_source
from ipadapter_jax.preprocessing import CLIPImageConfig
from ipadapter_jax.tokenizer import load_tokenizer, write_word_tokenizer

WORDS = ["a", "photo", "of", "red", "green", "blue", "cat", "dog", "on", "the", "beach", "at",
         "night", "painting", "city", "street"]


def make_images(folder: str, count: int, seed: int = 0) -> str:
  """`count` JPEGs with some structure and noise, and their annotation file; returns its path."""
  rng = np.random.default_rng(seed)
  entries = []
  for i in range(count):
    height, width = (480, 640) if i % 2 else (640, 480)
    blocks = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(blocks).resize((width, height), Image.Resampling.BILINEAR))
    noise = rng.integers(-12, 13, (height, width, 3))
    pixels = np.clip(base.astype(np.int32) + noise, 0, 255).astype(np.uint8)
    name = f"{i:05d}.jpg"
    Image.fromarray(pixels).save(os.path.join(folder, name), quality=90)
    caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
    entries.append(f'{{"image_file": "{name}", "text": "{caption}"}}')
  path = os.path.join(folder, "data.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(entries) + "\n")
  return path


def sd15_cache(out_dir: str, count: int, resolution: int, seed: int = 0) -> str:
  """An embedding cache of random records with SD1.5's shapes at `resolution`."""
  r = resolution // 8
  shapes = {"latent_mean": (r, r, 4), "latent_logvar": (r, r, 4), "image_embeds": (1024,),
            "text_context": (77, 768), "time_ids": (6,)}
  rng = np.random.default_rng(seed)
  examples = ({k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
              for _ in range(count))
  return write_cache(examples, shapes, out_dir, settings={"resolution": resolution},
                     name=f"cache_{resolution}")


def throughput(source, spec: DataSpec, *, batch_size: int, batches: int, worker_count: int,
               threads: int | None) -> float:
  """Examples per second over `batches` global batches, after one warm-up batch."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  it = make_train_iterator(source, spec, global_batch_size=batch_size, mesh=mesh, seed=0,
                           worker_count=worker_count, num_threads=threads)
  jax.block_until_ready(next(it))
  start = time.perf_counter()
  for _ in range(batches):
    jax.block_until_ready(next(it))
  elapsed = time.perf_counter() - start
  it.close()
  return batches * batch_size / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 512])
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=16)
  parser.add_argument("--worker_count", type=int, default=0)
  parser.add_argument("--threads", type=int, default=None, help="reading threads per process")
  args = parser.parse_args()
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs, "
        f"worker_count={args.worker_count}, batch {args.batch_size}")
  with tempfile.TemporaryDirectory() as tmp:
    images = os.path.join(tmp, "images")
    os.makedirs(images)
    start = time.perf_counter()
    annotations = make_images(images, args.num_images)
    report = build_image_text_dataset(annotations, images, os.path.join(tmp, "datasets"))
    print(f"built {report.num_examples} examples in {time.perf_counter() - start:.1f} s "
          "(generation included)")
    write_word_tokenizer(os.path.join(tmp, "tokenizer"), WORDS)
    tokenizer = load_tokenizer(os.path.join(tmp, "tokenizer"))
    raw = open_source(report.dataset_dir)
    kw = dict(batch_size=args.batch_size, batches=args.batches, worker_count=args.worker_count,
              threads=args.threads)
    rows = []
    for resolution in args.resolutions:
      spec = DataSpec(resolution=resolution, random_crop=False, clip=CLIPImageConfig(),
                      tokenizer=tokenizer)
      rows.append((f"raw    {resolution:4d} px", throughput(raw, spec, **kw)))
      cache = open_source(sd15_cache(os.path.join(tmp, "caches"), args.num_images, resolution))
      rows.append((f"cached {resolution:4d} px", throughput(cache, spec, **kw)))
    for label, rate in rows:
      print(f"{label}: {rate:8.1f} examples/s")


if __name__ == "__main__":
  main()
