"""Image-prompt fidelity metrics: the paper's CLIP-I and CLIP-T, and the toy world's attributes.

CLIP-I (Ye et al., 2023, Table 1) is the cosine similarity of the CLIP image embeddings of a
generated image and its prompt image. CLIP-T is the CLIPScore (Hessel et al., 2021) of a
generated image against the prompt image's caption: 2.5 * max(cosine, 0) of the image and text
embeddings. Both work with any CLIP loaded here (the toy CLIP, or ViT-L/14 for real runs, e.g.
`load_clip_vision` / `load_clip_text(..., with_projection=True)` on a CLIPModel folder).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.data import shapes
from ipadapter_jax.data.preprocessing import CLIPImageConfig, clip_pixels
from ipadapter_jax.data.tokenizer import tokenize

CLIPSCORE_WEIGHT = 2.5


def _to_uint8(images) -> list[np.ndarray]:
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
  return _normalise(_image_embeds(encoder, jnp.asarray(clip_pixels(_to_uint8(images), processor))))


def text_embeddings(encoder, tokenizer, captions: Sequence[str]) -> np.ndarray:
  """L2-normalised CLIP text embeddings [N, P] (the text tower needs its projection)."""
  if encoder.text_projection is None:
    raise ValueError("CLIP-T needs the text tower with its projection (with_projection=True)")
  return _normalise(_text_embeds(encoder, jnp.asarray(tokenize(tokenizer, list(captions)))))


def clip_i(image_encoder, processor: CLIPImageConfig, generated, prompt_images) -> float:
  """Mean cosine similarity of each generated image with its prompt image."""
  a = image_embeddings(image_encoder, processor, generated)
  b = image_embeddings(image_encoder, processor, prompt_images)
  return float(np.mean(np.sum(a * b, axis=-1)))


def clip_t(image_encoder, processor: CLIPImageConfig, text_encoder, tokenizer, generated,
           captions: Sequence[str]) -> float:
  """Mean CLIPScore, 2.5 * max(cos, 0), of each generated image with its caption."""
  a = image_embeddings(image_encoder, processor, generated)
  b = text_embeddings(text_encoder, tokenizer, captions)
  return float(np.mean(CLIPSCORE_WEIGHT * np.maximum(np.sum(a * b, axis=-1), 0.0)))


def attribute_scores(generated, targets: Sequence[dict]) -> dict[str, float]:
  """Toy world: the fraction of generated images whose shape colour / shape class (read from
  the pixels by `shapes.judge`, no trained model) equals the target's."""
  judged = [shapes.judge(image) for image in _to_uint8(generated)]
  colour = np.mean([j["colour"] == t["colour"] for j, t in zip(judged, targets)])
  shape = np.mean([j["shape"] == t["shape"] for j, t in zip(judged, targets)])
  return {"colour_match": float(colour), "shape_match": float(shape)}
