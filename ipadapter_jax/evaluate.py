"""Image-prompt fidelity metrics: the paper's CLIP-I and CLIP-T, and the toy world's attributes.

CLIP-I (Ye et al., 2023, Table 1) is the cosine similarity of the CLIP image embeddings of a
generated image and its prompt image. CLIP-T is the CLIPScore (Hessel et al., 2021) of a
generated image against the prompt image's caption: 2.5 * max(cosine, 0) of the image and text
embeddings. Both work with any CLIP loaded here (the toy CLIP, or ViT-L/14 for real runs, e.g.
`load_clip_vision` / `load_clip_text(..., with_projection=True)` on a CLIPModel folder).

The paper's protocol as a command (COCO-style annotations: image_file + text per record; four
images per prompt image, image prompt only):

  ipadapter-jax evaluate --pretrained SD_FOLDER --image_encoder ENCODER \
      --ip_adapter ip-adapter_sd15.safetensors --clip openai/clip-vit-large-patch14 \
      --annotations coco_val2017_2000.json --data_root coco/val2017 --out eval.json
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.preprocessing import CLIPImageConfig, clip_pixels, load_image
from ipadapter_jax.tokenizer import tokenize

CLIPSCORE_WEIGHT = 2.5


def to_uint8(images) -> list[np.ndarray]:
  """Float images in [0, 1] (as the pipeline returns them) or uint8 images -> uint8 arrays."""
  out = []
  for image in images:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    out.append(image)
  return out


@nnx.jit
def _image_embeds(encoder, pixels):
  return encoder(pixels).image_embeds


@nnx.jit
def _text_embeds(encoder, ids):
  return encoder(ids).text_embeds


def _normalise(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def image_embeddings(encoder, processor: CLIPImageConfig, images) -> np.ndarray:
  """L2-normalised CLIP image embeddings [N, P] of PIL images or arrays."""
  return _normalise(_image_embeds(encoder, jnp.asarray(clip_pixels(to_uint8(images), processor))))


def text_embeddings(encoder, tokenizer, captions: Sequence[str]) -> np.ndarray:
  """L2-normalised CLIP text embeddings [N, P] (the text tower needs its projection)."""
  if encoder.text_projection is None:
    raise ValueError("CLIP-T needs the text tower with its projection (with_projection=True)")
  return _normalise(_text_embeds(encoder, jnp.asarray(tokenize(tokenizer, list(captions)))))


def cosines(a, b) -> np.ndarray:
  """Per pair, the cosine of two unit embeddings ([N, D] each): CLIP-I's per-image values."""
  return np.sum(a * b, axis=-1)


def clipscores(images, texts) -> np.ndarray:
  """Per pair, CLIPScore (Hessel et al.): CLIPSCORE_WEIGHT * max(cosine, 0), CLIP-T's values."""
  return CLIPSCORE_WEIGHT * np.maximum(cosines(images, texts), 0.0)


def _mean(score, a, b) -> float:
  return float(np.mean(score(a, b)))


def clip_i(image_encoder, processor: CLIPImageConfig, generated, prompt_images) -> float:
  """Mean cosine similarity of each generated image with its prompt image."""
  return _mean(
    cosines,
    image_embeddings(image_encoder, processor, generated),
    image_embeddings(image_encoder, processor, prompt_images),
  )


def clip_t(
  image_encoder,
  processor: CLIPImageConfig,
  text_encoder,
  tokenizer,
  generated,
  captions: Sequence[str],
) -> float:
  """Mean CLIPScore, 2.5 * max(cos, 0), of each generated image with its caption."""
  return _mean(
    clipscores,
    image_embeddings(image_encoder, processor, generated),
    text_embeddings(text_encoder, tokenizer, captions),
  )


def attribute_matches(generated, targets: Sequence[dict], judge) -> dict[str, np.ndarray]:
  """Per generated image, whether its shape colour / shape class, read from the pixels by
  `judge` (uint8 image -> {"colour", "shape", ...}; the toy world's is `toy.shapes.judge`),
  equals the target's ({"colour", "shape"} bools)."""
  judged = [judge(image) for image in to_uint8(generated)]
  return {
    key: np.array([j[key] == t[key] for j, t in zip(judged, targets)])
    for key in ("colour", "shape")
  }


Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
  """The Wilson score interval of a binomial rate (95% by default): unlike the normal
  approximation it stays inside [0, 1] and is honest at rates near 0 or 1."""
  if n <= 0:
    raise ValueError(f"a rate needs at least one trial, got n={n}")
  p = successes / n
  denominator = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denominator
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
  return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def rate(hits) -> dict:
  """{"rate", "ci95", "n"} of a boolean array: the fraction and its Wilson interval."""
  hits = np.asarray(hits, bool)
  return {
    "rate": float(hits.mean()),
    "ci95": list(wilson_interval(int(hits.sum()), hits.size)),
    "n": int(hits.size),
  }


class CLIPScorer(NamedTuple):
  """The CLIP that CLIP-I and CLIP-T are measured with."""

  text_encoder: object
  tokenizer: object
  image_encoder: object
  processor: CLIPImageConfig

  @classmethod
  def load(cls, path_or_id: str) -> "CLIPScorer":
    """Both towers of a transformers CLIPModel folder or hub id (openai/clip-vit-large-patch14)."""
    from ipadapter_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
    from ipadapter_jax.weights import load_clip_text, load_clip_vision  # pylint: disable=import-outside-toplevel
    from ipadapter_jax.weights.folders import local_path  # pylint: disable=import-outside-toplevel
    from ipadapter_jax.weights.transformers import clip_patterns  # pylint: disable=import-outside-toplevel

    folder = local_path(path_or_id, allow_patterns=clip_patterns(tokenizer=True))
    return cls(
      load_clip_text(folder, with_projection=True),
      load_tokenizer(folder),
      load_clip_vision(folder),
      CLIPImageConfig.from_folder(folder),
    )

  def score(self, generated, prompt_images, captions: Sequence[str]) -> dict[str, float]:
    """{"clip_i", "clip_t"} of generated images against their prompt images and captions."""
    embeds = image_embeddings(self.image_encoder, self.processor, generated)  # once for both
    prompts = image_embeddings(self.image_encoder, self.processor, prompt_images)
    texts = text_embeddings(self.text_encoder, self.tokenizer, captions)
    return {"clip_i": _mean(cosines, embeds, prompts), "clip_t": _mean(clipscores, embeds, texts)}


def generate(
  pipe,
  prompts: Sequence[str],
  images: Sequence | None,
  *,
  batch_size: int,
  seed: int = 0,
  per_request: dict[str, Sequence] | None = None,
  **request,
) -> np.ndarray:
  """Images for many (prompt, image) requests, `batch_size` requests per call so that one
  program serves them all (the last call is padded). `per_request` holds pipeline arguments
  given per request ({"init_image": [...]}), `request` those shared by all. Grouped by
  request, `num_samples` each."""
  count = len(prompts)
  out = []
  for start in range(0, count, batch_size):
    idx = [min(i, count - 1) for i in range(start, start + batch_size)]
    extra = {key: [values[i] for i in idx] for key, values in (per_request or {}).items()}
    chunk = pipe(
      [prompts[i] for i in idx],
      None if images is None else [images[i] for i in idx],
      seed=seed + start,
      output_type="np",
      **extra,
      **request,
    ).images
    per_request_images = chunk.shape[0] // batch_size
    out.append(chunk[: per_request_images * min(batch_size, count - start)])
  return np.concatenate(out)


def load_annotated_images(
  annotations: str, limit: int | None = None, data_root: str | None = None
) -> tuple[list, list[dict]]:
  """(PIL images, records) of the first `limit` records of a COCO-style annotation file
  (`{image_file, text}` per record; paths relative to `data_root`, by default the file's
  folder). Images are read as diffusers' load_image reads them; a missing, unreadable or
  oversized one is a ValueError naming it."""
  from ipadapter_jax.data.image_text import read_annotations  # pylint: disable=import-outside-toplevel

  records = read_annotations(annotations)[:limit]
  root = data_root or os.path.dirname(os.path.abspath(annotations))
  images = [load_image(os.path.join(root, record["image_file"])) for record in records]
  return images, records
