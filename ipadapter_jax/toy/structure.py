"""The toy world's structure checks: the image prompt with img2img and with inpainting.

The paper claims IP-Adapter works with both. For pairs of held-out prompt images (the second of
another colour and, where the set has one, another shape), the first is the init image and the
second the image prompt, with an empty text.

img2img: the output should take the prompt image's colour and keep the init image's shape
(`shapes.judge`, as the main evaluation reads colour and shape) and its position (the blob's
centre within CENTRE_TOLERANCE pixels of the init shape's). Every strength in STRENGTHS is a row;
the one the structure claim names is chosen on validation pairs (`choose_strength`), not these.

Inpainting (the regular UNet, the known latents put back after every step, diffusers' default
strength 1.0): the half of the init image holding its shape's centre is repainted. The repainted
half should take the prompt image's colour (`toy_composition.half_colours`); the kept half
should keep the init image's colour. In latent space the kept half comes back through the VAE,
so its pixels are the init's up to the VAE's error, which is reported (mean absolute difference).

Each setting is compared with the same pairs and seeds at adapter scale 0 (the base alone, the
same compiled program): there the colour should stay the init image's.
"""

from __future__ import annotations

import numpy as np

from ipadapter_jax import evaluate
from ipadapter_jax.toy import composition as toy_composition
from ipadapter_jax.toy import shapes, stats

STRENGTHS = (0.3, 0.5, 0.7, 0.85)  # the img2img rows; the claim's is chosen among them
CENTRE_TOLERANCE = 4.0  # pixels: a triangle's centroid lies up to 3.1 px from its centre


def contrast_pairs(examples) -> list[tuple[int, int]]:
  """(i, j) for each example i: j is the next example (cyclically) of another colour, and of
  another shape too where one exists."""
  n = len(examples)
  out = []
  for i, ex in enumerate(examples):
    order = [k % n for k in range(i + 1, i + n + 1)]
    other = [k for k in order if examples[k].colour != ex.colour]
    both = [k for k in other if examples[k].shape != ex.shape]
    out.append((i, (both or other)[0]))
  return out


def masked_half(ex: shapes.Example, size: int) -> int:
  """0 (left) or 1 (right): the half holding the example's shape centre, the part repainted."""
  return int(ex.centre[1] >= size // 2)


def blob_centre(image_u8: np.ndarray) -> tuple[float, float] | None:
  """The foreground's centroid (row, column) in the coordinates of `Example.centre`, the
  foreground as `shapes.judge` finds it; None without foreground."""
  foreground = shapes.foreground(image_u8.astype(np.float32))
  if foreground.sum() < 3:
    return None
  rows, cols = np.nonzero(foreground)
  return float(rows.mean() + 0.5), float(cols.mean() + 0.5)


def near(centre, ex: shapes.Example, tolerance: float = CENTRE_TOLERANCE) -> bool:
  """Whether a blob centre (or None) lies within `tolerance` pixels of the example's."""
  return centre is not None and bool(
    np.hypot(centre[0] - ex.centre[0], centre[1] - ex.centre[1]) <= tolerance
  )


def img2img_scores(generated, examples, pairs) -> dict:
  """The judged colour, shape and position of each output against the init (i) and prompt (j)
  images."""
  images = evaluate.to_uint8(generated)
  judged = [shapes.judge(image) for image in images]
  centres = [blob_centre(image) for image in images]
  init = [examples[i] for i, _ in pairs]
  prompt = [examples[j] for _, j in pairs]
  colour = [g["colour"] == p.colour for g, p in zip(judged, prompt)]
  shape = [g["shape"] == e.shape for g, e in zip(judged, init)]
  centre = [near(c, e) for c, e in zip(centres, init)]
  return {
    "colour = prompt image's": evaluate.rate(colour),
    "colour = init image's": evaluate.rate([g["colour"] == e.colour for g, e in zip(judged, init)]),
    "shape = init image's": evaluate.rate(shape),
    "shape = prompt image's": evaluate.rate(
      [g["shape"] == p.shape for g, p in zip(judged, prompt)]
    ),
    "centre = init image's": evaluate.rate(centre),
    "centre = prompt image's": evaluate.rate([near(c, p) for c, p in zip(centres, prompt)]),
    "prompt's colour, init's shape": evaluate.rate(np.logical_and(colour, shape)),
    "prompt's colour, init's centre": evaluate.rate(np.logical_and(colour, centre)),
  }


def inpaint_scores(generated, examples, pairs, inits, size: int) -> dict:
  """Per output: the repainted half's colour against the prompt and init images, and whether
  the kept half keeps the init image's colour (and by how much its pixels differ)."""
  to_prompt, to_init, drawn, kept, diffs = [], [], [], [], []
  for image, (i, j), init in zip(evaluate.to_uint8(generated), pairs, inits):
    half = masked_half(examples[i], size)
    got = toy_composition.half_colours(image)
    to_prompt.append(got[half] == examples[j].colour)
    to_init.append(got[half] == examples[i].colour)
    if got[half] != "none":
      drawn.append(got[half] == examples[j].colour)
    init = np.asarray(init)
    kept.append(got[1 - half] == toy_composition.half_colours(init)[1 - half])
    columns = slice(size // 2, None) if half == 0 else slice(0, size // 2)
    diffs.append(float(np.abs(image[:, columns].astype(float) - init[:, columns]).mean()))
  return {
    "repainted half: prompt image's colour": evaluate.rate(to_prompt),
    "repainted half: init image's colour": evaluate.rate(to_init),
    "repainted halves with foreground: prompt image's colour": stats.rate(drawn),
    "kept half: init image's colour": evaluate.rate(kept),
    "kept half: mean abs difference": round(float(np.mean(diffs)), 2),
  }


def structure(
  pipe,
  examples,
  images,
  *,
  count: int,
  sampling_steps: int,
  guidance_scale: float,
  batch_size: int,
  strength: float,
  strengths=STRENGTHS,
) -> dict:
  """{"img2img": {setting: rates}, "inpainting": {setting: rates}, "strength", "pairs"} for the
  first `count` contrast pairs; both scales of a setting see the same noise (seeds per batch),
  so the rows differ by the image prompt alone."""
  size = images[0].size[0]
  pairs = contrast_pairs(examples)[:count]
  inits = [images[i] for i, _ in pairs]
  prompts = [images[j] for _, j in pairs]
  common = dict(
    batch_size=batch_size, num_inference_steps=sampling_steps, guidance_scale=guidance_scale
  )
  settings = (("image prompt (scale 1.0)", 1.0), ("no image prompt (scale 0)", 0.0))
  out = {"img2img": {}, "inpainting": {}, "strength": strength, "pairs": len(pairs)}
  for level in strengths:
    for name, scale in settings:
      generated = evaluate.generate(
        pipe,
        [""] * len(pairs),
        prompts,
        strength=level,
        scale=scale,
        per_request={"init_image": inits},
        **common,
      )
      out["img2img"][f"strength {level}, {name}"] = img2img_scores(generated, examples, pairs)
  left, right = toy_composition.half_masks(size)
  masks = [(left, right)[masked_half(examples[i], size)] for i, _ in pairs]
  for name, scale in settings:
    generated = evaluate.generate(
      pipe,
      [""] * len(pairs),
      prompts,
      strength=1.0,
      scale=scale,
      per_request={"init_image": inits, "mask_image": masks},
      **common,
    )
    out["inpainting"][f"shape's half repainted, {name}"] = inpaint_scores(
      generated, examples, pairs, inits, size
    )
  return out


def pick_strength(rates: dict) -> float:
  """choose_strength's rule on {strength: img2img_scores}."""
  keeps_init = [
    s
    for s, r in rates.items()
    if r["shape = init image's"]["ci95"][0] > r["shape = prompt image's"]["ci95"][1]
  ]
  return max(
    keeps_init or rates, key=lambda s: (rates[s]["prompt's colour, init's shape"]["rate"], -s)
  )


def choose_strength(
  pipe,
  examples,
  images,
  *,
  count: int,
  sampling_steps: int,
  guidance_scale: float,
  batch_size: int,
  strengths=STRENGTHS,
) -> dict:
  """{"strength", "img2img": {setting: rates}, "pairs"}: the img2img strength with the most pairs
  that take the prompt's colour and keep the init's shape, among the strengths whose outputs keep
  the init's shape more often than the prompt's (95% intervals apart; ties: the lower strength),
  with the image prompt at scale 1 on the first `count` contrast pairs. Run on validation pairs,
  never on the evaluation's."""
  pairs = contrast_pairs(examples)[:count]
  rates = {}
  for level in strengths:
    generated = evaluate.generate(
      pipe,
      [""] * len(pairs),
      [images[j] for _, j in pairs],
      strength=level,
      scale=1.0,
      batch_size=batch_size,
      per_request={"init_image": [images[i] for i, _ in pairs]},
      num_inference_steps=sampling_steps,
      guidance_scale=guidance_scale,
    )
    rates[level] = img2img_scores(generated, examples, pairs)
  return {
    "strength": pick_strength(rates),
    "pairs": len(pairs),
    "img2img": {f"strength {s}, image prompt (scale 1.0)": r for s, r in rates.items()},
  }


def _markdown(title: str, rows: dict) -> list[str]:
  names = list(next(iter(rows.values())))
  lines = [f"| {title} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  for setting, measures in rows.items():
    cells = [stats.pct(m) if isinstance(m, dict) else str(m) for m in measures.values()]
    lines.append(f"| {setting} | " + " | ".join(cells) + " |")
  return lines + [""]


def table(result: dict) -> str:
  """The checks, and the strength choice when there is one, as Markdown tables (rates with
  their 95% intervals)."""
  lines = _markdown("img2img", result["img2img"]) + _markdown("inpainting", result["inpainting"])
  choice = result.get("strength_choice")
  if choice:
    lines += _markdown(f"img2img, {choice['pairs']} validation pairs", choice["img2img"])
  lines.append(
    f"{result['pairs']} pairs of held-out images (init image, image prompt of another "
    f"colour), empty text; the structure claim's img2img strength, "
    f"{result['strength']}, was chosen on the validation pairs; "
    f"[95% Wilson interval]."
  )
  return "\n".join(lines)
