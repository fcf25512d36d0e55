"""Which caption words does a toy base model listen to, and at which noise levels?

  python -m ipadapter_jax.toy.probe [--model DIR] [--count 256] [--timesteps 200,600,950]

For held-out images noised to timestep t, the model predicts the clean image twice: once with the
true full caption and once with the same caption but one attribute word (the shape or the colour)
swapped for another. `shapes.judge` reads that attribute from both one-step predictions. A model
that uses the word moves its prediction to the swapped value; one that ignores it stays with
whatever the noisy pixels still show. At high t, where sampling decides the attribute, only the
caption can carry it (docs/toy_world.md, "How the base recipe was chosen"). With a VAE the
noising and the prediction are in its latent space, and the prediction is decoded to be judged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax import evaluate
from ipadapter_jax.diffusion.schedule import NoiseSchedule, predicted_x0
from ipadapter_jax.generation.conditioning import encode_text
from ipadapter_jax.models.vae import scale_latents, unscale_latents
from ipadapter_jax.tokenizer import tokenize
from ipadapter_jax.toy import shapes
from ipadapter_jax.toy.configs import world as toy_world
from ipadapter_jax.toy.evaluation import held_out
from ipadapter_jax.weights import load_stable_diffusion

ATTRIBUTES = ("shape", "colour")


def swapped_values(examples, attribute: str) -> list[str]:
  """Another value of `attribute` for each example, varied over the examples."""
  choices = shapes.SHAPES if attribute == "shape" else tuple(shapes.COLOURS)
  out = []
  for i, ex in enumerate(examples):
    others = [c for c in choices if c != getattr(ex, attribute)]
    out.append(others[i % len(others)])
  return out


def x0_prediction(model, x_t, t: int, context, alpha_bar: float):
  """The model's one-step clean image from x_t."""
  output = np.asarray(model.unet(jnp.asarray(x_t), jnp.full((x_t.shape[0],), t), context))
  return predicted_x0(
    model.scheduler_config.get("prediction_type", "epsilon"),
    output,
    x_t,
    np.sqrt(alpha_bar),
    np.sqrt(1 - alpha_bar),
  )


_encode_means = nnx.jit(lambda vae, x: vae.encode(x)[0])
_decode = nnx.jit(lambda vae, z: vae.decode(z))


def to_model_space(model, pixels):
  """Images in [-1, 1] -> what the UNet denoises: the scaled VAE posterior means (the pixels
  themselves for a pixel-space base)."""
  if model.vae is None:
    return pixels
  return scale_latents(_encode_means(model.vae, jnp.asarray(pixels)), model.vae.config)


def to_pixels(model, x0):
  """The inverse of `to_model_space`: decoded latents (in [-1, 1])."""
  if model.vae is None:
    return x0
  return _decode(model.vae, unscale_latents(jnp.asarray(x0), model.vae.config))


def probe(model_dir: str, count: int, timesteps, seed: int = 0) -> dict:
  """{attribute: {t: rates}}: with the true and the swapped caption, how often the judged
  attribute of the one-step prediction is the true value and how often the swapped one."""
  model = load_stable_diffusion(model_dir)
  alphas = NoiseSchedule.from_diffusers(model.scheduler_config).alphas_cumprod()
  examples = held_out(count)
  pixels = np.stack([shapes.render(ex, toy_world.IMAGE_SIZE) for ex in examples])
  x0 = np.asarray(to_model_space(model, pixels.astype(np.float32) / 127.5 - 1))
  noise = np.random.default_rng(seed).standard_normal(x0.shape).astype(np.float32)
  encode = jax.jit(lambda ids: encode_text(model.text_encoder, None, ids)[0])
  context = lambda examples: encode(
    tokenize(model.tokenizer, [shapes.describe(e) for e in examples])
  )
  result = {"model": model_dir, "count": count}
  for attribute in ATTRIBUTES:
    truth = [getattr(ex, attribute) for ex in examples]
    other = swapped_values(examples, attribute)
    captions = {
      "true caption": context(examples),
      "swapped caption": context(
        [dataclasses.replace(ex, **{attribute: value}) for ex, value in zip(examples, other)]
      ),
    }
    rows = {}
    for t in timesteps:
      x_t = np.sqrt(alphas[t]) * x0 + np.sqrt(1 - alphas[t]) * noise
      row = {"alpha_bar": round(float(alphas[t]), 4)}
      for name, ctx in captions.items():
        predicted = to_pixels(model, x0_prediction(model, x_t, t, ctx, alphas[t]))
        judged = [
          shapes.judge(evaluate.to_uint8(image))[attribute]
          for image in np.clip(np.asarray(predicted) / 2 + 0.5, 0, 1)
        ]
        row[name] = {
          "true value": float(np.mean([j == v for j, v in zip(judged, truth)])),
          "swapped value": float(np.mean([j == v for j, v in zip(judged, other)])),
        }
      rows[int(t)] = row
    result[attribute] = rows
  return result


def table(result: dict) -> str:
  lines = [
    "| word | t (alpha_bar) | true caption: judged true | swapped caption: judged true | "
    "swapped caption: judged swapped |",
    "|---|---|---|---|---|",
  ]
  for attribute in ATTRIBUTES:
    for t, row in result[attribute].items():
      lines.append(
        f"| {attribute} | {t} ({row['alpha_bar']}) | "
        f"{row['true caption']['true value']:.0%} | "
        f"{row['swapped caption']['true value']:.0%} | "
        f"{row['swapped caption']['swapped value']:.0%} |"
      )
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m ipadapter_jax.toy.probe", description=__doc__.split("\n")[0]
  )
  p.add_argument("--model", default=toy_world.SHIPPED + "/base", help="a toy base folder")
  p.add_argument("--count", type=int, default=256, help="held-out images")
  p.add_argument(
    "--timesteps", default="200,400,600,800,950", help="comma-separated training timesteps"
  )
  p.add_argument("--out", default=None, help="also write the rates as JSON")
  args = p.parse_args(argv)
  result = probe(args.model, args.count, [int(t) for t in args.timesteps.split(",")])
  print(table(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
