r"""Build, cache and inspect datasets.

  ipadapter-jax data build --annotations data.json --data_root DIR --out DIR
  ipadapter-jax data inspect DIR [--grid grid.png]
  ipadapter-jax data cache --source DIR --model SD --image_encoder ENC --out DIR \
      --resolution 512 [--dtype bfloat16] [--distributed]

A source is anything data.source takes: an image folder with metadata.jsonl/csv, webdataset
shards (a folder, shards/{00000..00099}.tar, gs://...), a built dataset folder. On several hosts
the cache command runs on each (with --distributed, or --process_index/--process_count), each
host encoding and writing its own parts.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ipadapter_jax.cli.common import Parser, run_command


def _build(args) -> int:
  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.data.image_text import build_image_text_dataset

  report = build_image_text_dataset(
    args.annotations,
    args.data_root,
    args.out,
    name=args.name,
    version=args.version,
    num_threads=args.threads,
  )
  kinds = ", ".join(f"{count} {kind}" for kind, count in report.skipped_by_kind().items())
  print(
    f"{report.dataset_dir}: {report.num_examples} examples from {report.num_annotations} "
    f"annotations, {report.num_skipped} skipped" + (f" ({kinds})" if kinds else "")
  )
  for entry in report.skipped[:20]:
    print(f"  skipped {entry['image_file']}: {entry['reason']}")
  if report.num_skipped > 20:
    print(f"  ... {report.num_skipped - 20} more in {report.dataset_dir}/build_report.json")
  return 0


def _cache(args) -> int:
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp

  from ipadapter_jax.data.cache import build_embedding_cache
  from ipadapter_jax.data.input_pipeline import DataSpec, open_source
  from ipadapter_jax.weights.stable_diffusion import load_stable_diffusion

  if args.distributed:  # JAX's cluster detection (Cloud TPU VMs, GKE, SLURM) names this host
    jax.distributed.initialize()
  source = open_source(args.source, split=args.split)  # a bad source fails before the models load
  compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.compute_dtype]
  models = load_stable_diffusion(args.model, image_encoder=args.image_encoder, dtype=compute)
  spec = DataSpec(
    resolution=args.resolution,
    random_crop=False,
    clip=None,
    tokenizer=None,
    image_key=args.image_key,
    caption_key=args.caption_key,
  )
  report = build_embedding_cache(
    source,
    spec,
    models,
    args.out,
    image_features=args.image_features,
    batch_size=args.batch_size,
    dtype=args.dtype,
    name=args.name,
    process_index=None if args.process_index < 0 else args.process_index,
    process_count=None if args.process_count < 0 else args.process_count,
    examples_per_part=args.examples_per_part,
  )
  shapes = ", ".join(f"{k} {list(v)}" for k, v in report.shapes.items())
  if report.complete:
    print(
      f"{report.dataset_dir}: {report.num_examples} examples ({args.dtype}); per example {shapes}"
    )
  else:
    print(
      f"{report.dataset_dir}: this host's parts hold {report.num_examples} examples; the "
      "other hosts' parts are not all written yet (the last host to finish writes the "
      "index, cache.json)"
    )
  for record, problem in report.skipped[:20]:
    print(f"  skipped {record}: {problem}")
  if len(report.skipped) > 20:
    print(f"  ... {len(report.skipped) - 20} more in the parts' json files")
  return 0


def caption_grid(images: list[Image.Image], captions: list[str], cell: int = 160) -> Image.Image:
  """Thumbnails in a near-square grid, each with its caption written below it."""
  font = ImageFont.load_default(size=11)
  lines_per_caption, line_height = 3, 12
  strip = lines_per_caption * line_height + 4
  columns = math.ceil(math.sqrt(len(images)))
  rows = math.ceil(len(images) / columns)
  grid = Image.new("RGB", (columns * cell, rows * (cell + strip)), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for i, (image, caption) in enumerate(zip(images, captions)):
    x, y = (i % columns) * cell, (i // columns) * (cell + strip)
    thumb = ImageOps.contain(image.convert("RGB"), (cell - 4, cell - 4))  # up or down
    grid.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
    wrapped = textwrap.wrap(caption or "(empty caption)", width=cell // 7)[:lines_per_caption]
    for j, line in enumerate(wrapped):
      draw.text((x + 3, y + cell + j * line_height), line, fill=(0, 0, 0), font=font)
  return grid


def _first_records(source, count: int):
  """The first `count` records of a source: by index, or read from the first shards."""
  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.data import tar_shards

  if not isinstance(source, tar_shards.WebDatasetSource):
    return [source[i] for i in range(min(count, len(source)))]
  records = []
  for shard in source.shards:
    for _, record, _ in tar_shards.read_records(shard, limit=count - len(records)):
      records.append(record)
    if len(records) == count:
      break
  return records


def _inspect(args) -> int:
  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.data.image_text import read_build_report, resolve_dataset_dir
  from ipadapter_jax.data.input_pipeline import (
    decode_image,
    decode_text,
    is_cached,
    lookup,
    open_source,
    source_format,
    source_metadata,
  )

  kind = source_format(args.path)
  where = resolve_dataset_dir(args.path) if kind == "tfds" else args.path
  source = open_source(where, split=args.split)
  if kind == "tfds":
    info = source.dataset_info
    print(f"{where}: {info.name} {info.version}, {info.file_format.value}")
    for name, split in info.splits.items():
      print(f"  split {name}: {split.num_examples} examples")
    for key, feature in info.features.items():
      print(
        f"  feature {key}: {type(feature).__name__} {feature.shape} {np.dtype(feature.np_dtype)}"
      )
    report = read_build_report(where)
    if report is not None:
      print(
        f"  built from {report['num_annotations']} annotations, {report['num_skipped']} skipped"
      )
      for entry in report["skipped"][:10]:
        print(f"    skipped {entry['image_file']}: {entry['reason']}")
  else:
    print(source.describe())
    if kind == "cache":
      for key, (shape, dtype) in source.layout.fields.items():
        print(f"  feature {key}: {list(shape)} {dtype}")
  metadata = source_metadata(source)
  if metadata:
    print("  metadata: " + ", ".join(f"{k}={v}" for k, v in metadata.items()))
  if is_cached(source):
    if args.grid:
      print(f"{where}: an embedding cache has no images to draw", file=sys.stderr)
      return 1
    return 0
  images, captions = [], []
  for i, record in enumerate(_first_records(source, args.num)):
    try:
      images.append(decode_image(lookup(record, args.image_key, i), f"example {i}"))
      captions.append(decode_text(lookup(record, args.caption_key, i), f"example {i}"))
    except (ValueError, KeyError) as e:
      print(f"  [{i}] does not decode: {e}")
      continue
    example_id = decode_text(record["id"]) if "id" in record else str(i)
    print(f"  [{i}] {example_id} {images[-1].width}x{images[-1].height}: {captions[-1]!r}")
  if args.grid:
    caption_grid(images, captions).save(args.grid)
    print(f"wrote {args.grid} ({len(images)} examples)")
  return 0


def main(argv=None) -> int:
  parser = Parser(
    prog="ipadapter-jax data",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True)

  build = sub.add_parser("build", help="annotation file + image folder -> ArrayRecord dataset")
  build.add_argument("--annotations", required=True, help="JSON list or JSON Lines file")
  build.add_argument("--data_root", required=True, help="folder the image_file paths are in")
  build.add_argument("--out", required=True, help="output data_dir (gets NAME/VERSION/)")
  build.add_argument("--name", default="image_text")
  build.add_argument("--version", default="1.0.0")
  build.add_argument("--threads", type=int, default=8, help="image reading threads")
  build.set_defaults(run=_build)

  inspect = sub.add_parser("inspect", help="counts, features, examples and a caption grid")
  inspect.add_argument("path", help="a dataset folder, shards or cache (what data.source takes)")
  inspect.add_argument("--grid", help="write a PNG grid of the first examples here")
  inspect.add_argument("--num", type=int, default=16, help="examples to list and draw")
  inspect.add_argument("--split", default="train")
  inspect.add_argument("--image_key", default="image")
  inspect.add_argument("--caption_key", default="text")
  inspect.set_defaults(run=_inspect)

  cache = sub.add_parser("cache", help="run the frozen encoders once -> embedding cache")
  cache.add_argument(
    "--source", required=True, help="images and captions: what data.source takes (not a cache)"
  )
  cache.add_argument("--model", required=True, help="Stable Diffusion folder or hub id")
  cache.add_argument("--image_encoder", required=True, help="CLIP image encoder folder or id")
  cache.add_argument("--out", required=True, help="the cache folder (local or gs://)")
  cache.add_argument("--resolution", type=int, required=True)
  cache.add_argument(
    "--image_features", default="image_embeds", choices=["image_embeds", "hidden_states"]
  )
  cache.add_argument("--batch_size", type=int, default=16)
  cache.add_argument(
    "--dtype",
    default="float32",
    choices=["float32", "bfloat16"],
    help="stored arrays; bfloat16 halves the cache (training upcasts)",
  )
  cache.add_argument(
    "--compute_dtype",
    default="float32",
    choices=["float32", "bfloat16"],
    help="the encoders' compute dtype",
  )
  cache.add_argument("--split", default="train")
  cache.add_argument("--image_key", default="image")
  cache.add_argument("--caption_key", default="text")
  cache.add_argument(
    "--examples_per_part",
    type=int,
    default=4096,
    help="records per part file (a webdataset source: one part per shard)",
  )
  cache.add_argument(
    "--process_index",
    type=int,
    default=-1,
    help="this host's index among those building the cache (default: JAX's)",
  )
  cache.add_argument(
    "--process_count",
    type=int,
    default=-1,
    help="how many hosts build it together (default: JAX's)",
  )
  cache.add_argument(
    "--distributed",
    action="store_true",
    help="join the cluster first (jax.distributed.initialize())",
  )
  cache.add_argument("--name", default="embedding_cache")
  cache.set_defaults(run=_cache)

  args = parser.parse_args(argv)
  return run_command(lambda: args.run(args))  # a bad annotation file, folder or image: one line


if __name__ == "__main__":
  sys.exit(main())
