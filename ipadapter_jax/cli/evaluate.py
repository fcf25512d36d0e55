r"""The evaluate command: the paper's CLIP-I and CLIP-T of an IP-Adapter on an annotation file.

  ipadapter-jax evaluate --pretrained SD_FOLDER --image_encoder ENCODER \
      --ip_adapter ip-adapter_sd15.safetensors --clip openai/clip-vit-large-patch14 \
      --annotations coco_val2017_2000.json --data_root coco/val2017 --out eval.json

The metrics themselves are ipadapter_jax.evaluate's.
"""

from __future__ import annotations

import argparse
import json
import sys

from ipadapter_jax.cli.common import Parser, run_command


def build_parser() -> argparse.ArgumentParser:
  p = Parser(
    prog="ipadapter-jax evaluate",
    description="CLIP-I and CLIP-T of an IP-Adapter on an annotation file (the paper's "
    "protocol: images generated from each prompt image, scored with a CLIP).",
  )
  p.add_argument("--pretrained", required=True, help="diffusers Stable Diffusion folder or hub id")
  p.add_argument("--image_encoder", required=True, help="the adapter's CLIP image encoder")
  p.add_argument("--ip_adapter", required=True, help="official IP-Adapter file")
  p.add_argument(
    "--clip",
    required=True,
    help="CLIPModel folder or hub id that scores (openai/clip-vit-large-patch14)",
  )
  p.add_argument("--annotations", required=True, help="JSON list / JSONL of {image_file, text}")
  p.add_argument("--data_root", default=None, help="image folder (default: the annotations')")
  p.add_argument("--limit", type=int, default=2000, help="prompt images used (the paper: 2000)")
  p.add_argument(
    "--with_text", action="store_true", help="also give each record's caption as the text prompt"
  )
  p.add_argument("--scale", type=float, default=1.0)
  p.add_argument("--num_samples", type=int, default=4, help="images per prompt image")
  p.add_argument("--num_inference_steps", type=int, default=50)
  p.add_argument("--guidance_scale", type=float, default=7.5)
  p.add_argument("--batch_size", type=int, default=4, help="prompt images per compiled call")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="eval.json")
  return p


def evaluate_from_flags(args) -> dict:
  """Evaluates as `args` say; returns (and writes) the scores and settings."""
  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.evaluate import CLIPScorer, generate, load_annotated_images
  from ipadapter_jax.generation.pipeline import IPAdapterPipeline
  from ipadapter_jax.weights import load_stable_diffusion

  images, records = load_annotated_images(args.annotations, args.limit, args.data_root)
  captions = [record["text"] for record in records]
  pipe = IPAdapterPipeline(
    load_stable_diffusion(
      args.pretrained, image_encoder=args.image_encoder, ip_adapter=args.ip_adapter
    )
  )
  generated = generate(
    pipe,
    captions if args.with_text else [""] * len(records),
    images,
    batch_size=args.batch_size,
    seed=args.seed,
    scale=args.scale,
    num_samples=args.num_samples,
    guidance_scale=args.guidance_scale,
    num_inference_steps=args.num_inference_steps,
  )
  repeat = lambda xs: [x for x in xs for _ in range(args.num_samples)]
  scores = CLIPScorer.load(args.clip).score(generated, repeat(images), repeat(captions))
  result = {**scores, "prompt_images": len(records), **vars(args)}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(scores))
  return result


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return run_command(lambda: evaluate_from_flags(args))


if __name__ == "__main__":
  sys.exit(main())
