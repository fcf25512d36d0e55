"""The toy world's "shapes": one coloured shape on a coloured background, with procedural truth.

Every example is a pure function of (seed, index), so a dataset is reproducible from two
numbers. Captions name some of the attributes, so an image prompt carries information its text
may lack. `judge` reads the attributes back from pixels alone (no trained model), which is what
the toy world's colour and shape scores are measured with.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # shape colours; the background palette below is disjoint from it
  "red": (220, 40, 40),
  "green": (40, 180, 60),
  "blue": (50, 80, 230),
  "yellow": (235, 215, 50),
  "purple": (150, 60, 190),
  "orange": (245, 140, 30),
}
BACKGROUNDS = {
  "white": (245, 245, 245),
  "black": (20, 20, 20),
  "grey": (128, 128, 128),
  "brown": (110, 75, 45),
  "pink": (240, 175, 205),
  "navy": (25, 35, 95),
}
# Each world draws its backgrounds from its own part of the palette: the base model learns the
# first, a "community model" fine-tuned from it the second (a shift like a real fine-tune's new
# style); the toy CLIP sees both.
WORLDS = {
  "base": ("white", "black", "grey", "brown"),
  "community": ("pink", "navy"),
  "all": tuple(BACKGROUNDS),
}
WORDS = ("a", "an", "on", "background", "shape", *SHAPES, *COLOURS, *BACKGROUNDS)


@dataclasses.dataclass(frozen=True)
class Example:
  shape: str
  colour: str
  background: str
  radius: int
  centre: tuple[int, int]  # (row, column)
  caption: str


def _mask(shape: str, size: int, radius: int, centre) -> np.ndarray:
  """A boolean [size, size] mask of `shape` with half-width `radius` around `centre`."""
  rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  dy, dx = rows - centre[0], cols - centre[1]
  if shape == "circle":
    return dx * dx + dy * dy <= radius * radius
  if shape == "square":
    half = 0.8 * radius
    return (np.abs(dx) <= half) & (np.abs(dy) <= half)
  if shape == "triangle":  # pointing up: apex at the top, base at the bottom
    height = 1.6 * radius
    top = -0.8 * radius
    inside_rows = (dy >= top) & (dy <= top + height)
    return inside_rows & (np.abs(dx) <= (dy - top) / height * radius)
  arm = 0.35 * radius  # cross
  return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | (
    (np.abs(dy) <= arm) & (np.abs(dx) <= radius)
  )


FULL = 5  # the caption form naming every attribute


def _caption(form: int, shape: str, colour: str, background: str) -> str:
  text = [
    "",
    f"a {shape}",
    f"a {colour} shape",
    f"a {colour} {shape}",
    f"a {shape} on a {background} background",
    f"a {colour} {shape} on a {background} background",
  ][form]
  return "an" + text[1:] if text.startswith("a o") else text


def describe(ex: "Example") -> str:
  """The caption naming all of an example's attributes."""
  return _caption(FULL, ex.shape, ex.colour, ex.background)


def example(seed: int, index: int, size: int = 32, world: str = "base") -> Example:
  """The attributes of example `index` of the dataset with `seed` in `world` (WORLDS)."""
  rng = np.random.default_rng([seed, index])
  shape = SHAPES[rng.integers(len(SHAPES))]
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  background = WORLDS[world][rng.integers(len(WORLDS[world]))]
  radius = int(rng.integers(max(2, size * 6 // 32), max(3, size * 11 // 32) + 1))
  centre = tuple(int(c) for c in rng.integers(radius + 1, size - radius - 1, size=2))
  # A random subset of the attributes (possibly none) is named.
  return Example(
    shape,
    colour,
    background,
    radius,
    centre,
    _caption(int(rng.integers(FULL + 1)), shape, colour, background),
  )


def render(ex: Example, size: int = 32) -> np.ndarray:
  """The uint8 [size, size, 3] image of an example."""
  image = np.empty((size, size, 3), np.uint8)
  image[:] = BACKGROUNDS[ex.background]
  image[_mask(ex.shape, size, ex.radius, ex.centre)] = COLOURS[ex.colour]
  return image


def write_dataset(
  folder: str,
  num_examples: int,
  *,
  seed: int,
  size: int = 32,
  full_captions: float = 0.0,
  world: str = "base",
) -> str:
  """Writes PNGs and the official annotation list `data.json`; returns the annotation path.
  `full_captions`: the fraction of the captions (True: all) that name every attribute instead
  of the example's random subset."""
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  records = []
  for i in range(num_examples):
    ex = example(seed, i, size, world)
    name = f"images/{i:06d}.png"
    Image.fromarray(render(ex, size)).save(os.path.join(folder, name))
    full = np.random.default_rng([seed, i, 1]).random() < full_captions
    records.append(
      {
        "image_file": name,
        "text": describe(ex) if full else ex.caption,
        "id": str(i),
        "shape": ex.shape,
        "colour": ex.colour,
        "background": ex.background,
      }
    )
  path = os.path.join(folder, "data.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path


def _nearest(pixel, palette: dict) -> str:
  names = list(palette)
  distances = [np.sum((np.asarray(palette[n], np.float32) - pixel) ** 2) for n in names]
  return names[int(np.argmin(distances))]


FOREGROUND_DISTANCE = 60.0  # RGB distance from the background colour that makes a pixel foreground
# The best template overlap (IoU) that counts as a drawn shape, chosen on renders: clean and
# 3-tap-blurred renders of held-out examples overlap their best template by 0.83 or more, pixels
# scattered at random by 0.18 or less (tests/test_toy_shapes.py checks both sides). Below it an
# image "drew no shape", which tells "cannot draw" from "drew the wrong shape".
DREW_A_SHAPE = 0.5


def foreground(image: np.ndarray) -> np.ndarray:
  """Boolean [H, W]: the pixels of a uint8-scaled float image farther than FOREGROUND_DISTANCE
  from the background, taken to be the median border colour."""
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
  return np.sqrt(np.sum((image - np.median(border, axis=0)) ** 2, axis=-1)) > FOREGROUND_DISTANCE


def majority_colour(pixels: np.ndarray) -> str:
  """The palette colour (COLOURS) most of `pixels` ([N, 3]) are nearest to (ties: the first)."""
  palette = np.asarray(list(COLOURS.values()), np.float32)
  nearest = np.argmin(((pixels[:, None, :] - palette) ** 2).sum(axis=-1), axis=1)
  return list(COLOURS)[int(np.argmax(np.bincount(nearest, minlength=len(palette))))]


def judge(image: np.ndarray) -> dict:
  """{"background", "colour", "shape", "overlap"} read from the pixels of a (generated) image.

  Background: the median border colour. Colour: the palette colour most of the foreground
  pixels are nearest to. Shape: the template (at the blob's centre, sized by its area) that
  overlaps the blob best; "overlap" is that best IoU (0 without foreground), and a shape was
  drawn at all when it reaches DREW_A_SHAPE.
  """
  image = np.asarray(image, np.float32)
  if image.max() <= 1.0:
    image = image * 255.0
  size = image.shape[0]
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
  background = _nearest(np.median(border, axis=0), BACKGROUNDS)
  mask = foreground(image)
  if mask.sum() < 3:
    return {"background": background, "colour": "none", "shape": "none", "overlap": 0.0}
  colour = majority_colour(image[mask])
  rows, cols = np.nonzero(mask)
  centre = (rows.mean() + 0.5, cols.mean() + 0.5)
  radii = np.arange(2, size // 2, dtype=np.float32)[:, None, None]  # every size at once
  grid_rows, grid_cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  overlaps = []
  for shape in SHAPES:
    templates = _mask(shape, size, radii, centre)
    # Align each template's own centroid with the blob's (an empty template stays put).
    area = np.maximum(templates.sum(axis=(1, 2)), 1)
    own = [(templates * grid).sum(axis=(1, 2)) / area for grid in (grid_rows, grid_cols)]
    shifted = [
      np.where(templates.any(axis=(1, 2)), 2 * c - o, c)[:, None, None] for c, o in zip(centre, own)
    ]
    templates = _mask(shape, size, radii, shifted)
    overlaps.append(
      (templates & mask).sum(axis=(1, 2)) / np.maximum(1, (templates | mask).sum(axis=(1, 2)))
    )
  overlaps = np.stack(overlaps)  # [shape, radius]; ties go to the first shape, smallest radius
  best = np.unravel_index(np.argmax(overlaps), overlaps.shape)[0]
  return {
    "background": background,
    "colour": colour,
    "shape": SHAPES[best],
    "overlap": float(overlaps.max()),
  }


def blur(image: np.ndarray) -> np.ndarray:
  """A 3-tap [1, 2, 1] / 4 blur along both axes (edges repeated): the soft edges of a sample."""
  x = np.asarray(image, np.float32)
  for axis in (0, 1):
    padded = np.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(x.ndim)], mode="edge")
    taps = [np.take(padded, np.arange(k, k + x.shape[axis]), axis=axis) for k in range(3)]
    x = (taps[0] + 2 * taps[1] + taps[2]) / 4
  return x


def judge_accuracy(images, examples) -> dict[str, float]:
  """The fraction of `images` whose judged background, colour, shape and all three at once are
  their example's: the judge's own check, on renders, blurred renders or reconstructions."""
  judged = [judge(image) for image in images]
  right = {
    key: [j[key] == getattr(ex, key) for j, ex in zip(judged, examples)]
    for key in ("background", "colour", "shape")
  }
  right["all"] = np.logical_and.reduce([right[k] for k in ("background", "colour", "shape")])
  right["drew_a_shape"] = [j["overlap"] >= DREW_A_SHAPE for j in judged]
  return {key: float(np.mean(hits)) for key, hits in right.items()}
