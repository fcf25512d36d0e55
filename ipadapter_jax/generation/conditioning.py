"""What the UNet is conditioned on, and what a dropped or negative condition becomes.

Training, the embedding cache and sampling all encode text and images through these functions,
so the three cannot disagree (docs/reference.md §4 and §5): a dropped or unconditional image is
the zero embedding for the basic adapter and an all-zero normalised pixel tensor (a mean-grey
image) through the vision tower for Plus and Full-face; a dropped caption is the empty caption.
"""

from __future__ import annotations

import jax.numpy as jnp

IMAGE_EMBEDS = "image_embeds"  # CLIP image_embeds [B, E] (the basic adapter)
HIDDEN_STATES = "hidden_states"  # the vision tower's hidden_states[-2] [B, T, E] (Plus, Full-face)
IMAGE_FEATURES = (IMAGE_EMBEDS, HIDDEN_STATES)
CACHE_KEYS = {IMAGE_EMBEDS: "image_embeds", HIDDEN_STATES: "image_hidden_states"}  # data.cache


def where_batch(mask_B, a, b):
  """Per example: a where mask_B, else b (a may lack the batch axis: one value for all)."""
  return jnp.where(mask_B.reshape((-1,) + (1,) * (max(a.ndim, b.ndim) - 1)), a, b)


def encode_text(text_encoder, text_encoder_2, ids_BS, ids_2_BS=None):
  """Token ids -> (context [B, S, D], pooled [B, P] or None).

  SD1.x / SD2.x take the text encoder's last hidden state (after the final LayerNorm); SDXL
  concatenates both encoders' penultimate states and pools with encoder 2's projection.
  """
  if text_encoder_2 is None:
    return text_encoder(ids_BS).last_hidden_state, None
  first, second = text_encoder(ids_BS), text_encoder_2(ids_2_BS)
  context_BSD = jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], axis=-1)
  return context_BSD, second.text_embeds


def encode_image(image_encoder, pixels_BHWC, kind: str):
  """CLIP-normalised pixels -> the adapter's image features of `kind`."""
  if kind == IMAGE_EMBEDS:
    return image_encoder(pixels_BHWC).image_embeds
  if kind == HIDDEN_STATES:
    return image_encoder(pixels_BHWC).hidden_states[-2]
  raise ValueError(f"image features must be one of {IMAGE_FEATURES}, got {kind!r}")


def encode_image_or_null(image_encoder, pixels_BHWC, null_B, kind: str):
  """Image features where the examples in `null_B` get the unconditional features instead."""
  if kind == IMAGE_EMBEDS:  # the zero embedding: the projection's LayerNorm(bias) tokens
    embeds_BE = encode_image(image_encoder, pixels_BHWC, kind)
    return where_batch(null_B, jnp.zeros_like(embeds_BE), embeds_BE)
  grey_BHWC = where_batch(null_B, jnp.zeros_like(pixels_BHWC), pixels_BHWC)  # mean grey
  return encode_image(image_encoder, grey_BHWC, kind)


def null_image_features(image_encoder, kind: str):
  """The unconditional image features of one example, without the batch axis."""
  size, channels = image_encoder.config.image_size, image_encoder.config.num_channels
  zeros_1HWC = jnp.zeros((1, size, size, channels), jnp.float32)
  return encode_image_or_null(image_encoder, zeros_1HWC, jnp.ones((1,), bool), kind)[0]
