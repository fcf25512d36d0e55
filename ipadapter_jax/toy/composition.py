"""The toy world's composition check: two prompt images, each confined to one half by a mask.

For pairs of held-out prompt images of different colours, the adapter gets both images, the
first masked to the left half of the output and the second to the right half (diffusers' mask
semantics, docs/composition.md), with an empty text. A half "takes its image's colour" when the
majority palette colour of its foreground pixels is that image's colour. The same pairs without
masks (the two images' tokens concatenated) are the comparison: there nothing tells a half which
image to follow. The toy adapter learnt from one-shape images and often draws one blob, leaving
a half empty; the rate over the halves that hold foreground separates that from the colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ipadapter_jax import evaluate
from ipadapter_jax.generation.image_prompts import AdapterPrompt
from ipadapter_jax.toy import shapes, stats


def colour_pairs(examples) -> list[tuple[int, int]]:
  """(i, j) for each example i: j is the next example (cyclically) of another colour."""
  out = []
  for i, ex in enumerate(examples):
    j = next(
      k % len(examples)
      for k in range(i + 1, i + len(examples) + 1)
      if examples[k % len(examples)].colour != ex.colour
    )
    out.append((i, j))
  return out


def half_masks(size: int) -> tuple[Image.Image, Image.Image]:
  """White-on-black masks of the left and the right half of a size x size image."""
  left = np.zeros((size, size), np.uint8)
  left[:, : size // 2] = 255
  return Image.fromarray(left), Image.fromarray(255 - left)


def half_colours(image_u8: np.ndarray) -> tuple[str, str]:
  """The majority palette colour of the foreground in the left and in the right half ("none"
  for a half without foreground); the background is the image's median border colour."""
  image = image_u8.astype(np.float32)
  mask = shapes.foreground(image)
  half = image.shape[1] // 2
  colours = []
  for columns in (slice(0, half), slice(half, None)):
    pixels = image[:, columns][mask[:, columns]]
    colours.append(shapes.majority_colour(pixels) if len(pixels) >= 2 else "none")
  return colours[0], colours[1]


def composition(
  pipe, examples, images, *, count: int, sampling_steps: int, guidance_scale: float
) -> dict:
  """{setting: rates} for the first `count` pairs, with and without the half masks."""
  size = images[0].size[0]
  masks = list(half_masks(size))
  pairs = colour_pairs(examples)[:count]
  out = {}
  for name, use_masks in (("two images, left/right masks", True), ("two images, no masks", False)):
    left, right, drawn = [], [], []
    for i, j in pairs:
      adapter = AdapterPrompt([images[i], images[j]], masks=masks if use_masks else None)
      image = pipe(
        "",
        adapters=[adapter],
        num_inference_steps=sampling_steps,
        guidance_scale=guidance_scale,
        seed=i,
        output_type="np",
      ).images[0]
      got = half_colours(evaluate.to_uint8(image[None])[0])
      left.append(got[0] == examples[i].colour)
      right.append(got[1] == examples[j].colour)
      drawn += [g == examples[k].colour for g, k in zip(got, (i, j)) if g != "none"]
    both = [a and b for a, b in zip(left, right)]
    out[name] = {
      "left = first image's colour": evaluate.rate(left),
      "right = second image's colour": evaluate.rate(right),
      "both halves": evaluate.rate(both),
      "halves with foreground: their image's colour": stats.rate(drawn),
    }
  return out


def table(result: dict) -> str:
  lines = [
    "| setting | left = first image's colour | right = second image's colour | "
    "both halves | halves with foreground: their image's colour |",
    "|---|---|---|---|---|",
  ]
  for name, rates in result.items():
    lines.append(f"| {name} | " + " | ".join(stats.pct(m) for m in rates.values()) + " |")
  return "\n".join(lines)
