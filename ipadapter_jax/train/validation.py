"""Validation during training: every `eval_every` steps, images from a fixed held-out set with
the weights the run would export (the EMA when there is one), scored with a CLIP.

An adapter run is asked the paper's question (the prompt image alone: does the image come back?),
a base run its caption. Logged as `eval/clip_i` and `eval/clip_t`, and, when the config names an
attribute judge (`eval_judge`, the toy world's) and the annotations carry the attributes
(`colour`, `shape`), `eval/colour` and `eval/shape`: the fractions of images whose attributes,
read from the pixels, are the record's.
"""

from __future__ import annotations

import importlib

import numpy as np

from ipadapter_jax import evaluate
from ipadapter_jax.train.checks import TrainingError

ATTRIBUTES = ("colour", "shape")


class Validation:
  """The held-out set, its CLIP and one request shape: every call compiles nothing new."""

  def __init__(self, cfg, pipe):
    self.pipe = pipe
    try:
      self.images, self.records = evaluate.load_annotated_images(
        cfg.eval_annotations, cfg.eval_limit
      )
    except (OSError, ValueError) as e:
      raise TrainingError(f"eval_annotations: {e}") from None
    self.scorer = evaluate.CLIPScorer.load(cfg.eval_clip)
    self.image_prompt = pipe.models.unet.image_proj is not None
    self.judge = load_judge(cfg.eval_judge) if cfg.eval_judge else None
    self.attributes = self.judge is not None and all(
      key in r for r in self.records for key in ATTRIBUTES
    )
    self.batch_size = min(cfg.eval_batch_size, len(self.records))
    self.request = dict(
      num_inference_steps=cfg.eval_steps,
      guidance_scale=cfg.eval_guidance_scale,
      seed=cfg.seed,
      height=cfg.data.resolution,
      width=cfg.data.resolution,
    )

  def __call__(self, weights) -> dict[str, float]:
    """Scores of images made with `weights` (the trainable nnx.State, on the host)."""
    self.pipe.update_weights(weights)
    captions = [r["text"] for r in self.records]
    prompts = [""] * len(captions) if self.image_prompt else captions
    generated = evaluate.generate(
      self.pipe,
      prompts,
      self.images if self.image_prompt else None,
      batch_size=self.batch_size,
      **self.request,
    )
    scores = {
      f"eval/{k}": v for k, v in self.scorer.score(generated, self.images, captions).items()
    }
    if self.attributes:
      matches = evaluate.attribute_matches(generated, self.records, self.judge)
      scores.update({f"eval/{key}": float(np.mean(matches[key])) for key in ATTRIBUTES})
    return scores


def load_judge(name: str):
  """The function a "package.module:function" name points to (named in the config, so the
  trainer depends on no particular world)."""
  module, _, function = name.partition(":")
  try:
    return getattr(importlib.import_module(module), function)
  except (ImportError, AttributeError) as e:
    raise TrainingError(
      f"eval_judge: {name!r} is not an importable 'module:function' ({e})"
    ) from None
