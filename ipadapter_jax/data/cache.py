"""The frozen encoders run once over a dataset -> an ArrayRecord dataset of their outputs.

Training on the cache skips the VAE encoder, the CLIP image encoder and the text encoder(s): each
record holds the VAE posterior's moments (so a new latent is drawn every step with
`ipadapter_jax.models.vae.sample_posterior`), the image features, the text states and the
SDXL time ids of one example, all float32, NHWC for latents. `open_source(out_dir)` and
`make_train_iterator` read it like any other source. The encodings of the empty caption, which
condition dropout substitutes, are stored once in `empty_text.npz` beside the records.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
import types
from typing import Any, Iterable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx
from tqdm import tqdm

from ipadapter_jax.generation.conditioning import CACHE_KEYS, encode_image, encode_text
from ipadapter_jax.data.image_text import resolve_dataset_dir
from ipadapter_jax.data.input_pipeline import DataSpec, RawExample, is_cached
from ipadapter_jax.preprocessing import CLIPImageConfig
from ipadapter_jax.tokenizer import tokenize
from ipadapter_jax.models.networks import Networks
from ipadapter_jax.weights.stable_diffusion import StableDiffusion

CACHE_VERSION = "1.0.0"
EMPTY_TEXT_FILE = "empty_text.npz"


@dataclasses.dataclass(frozen=True)
class CacheReport:
  """Where the cache went and what each record holds."""
  dataset_dir: str
  num_examples: int
  shapes: dict[str, tuple[int, ...]]  # per example, float32
  settings: dict[str, Any]


class EmbeddingCache(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """float32 arrays of fixed shapes per example, written in the order they are given."""

  VERSION = tfds.core.Version(CACHE_VERSION)
  RELEASE_NOTES = {CACHE_VERSION: "VAE moments, image features, text states, time ids."}

  def __init__(self, *, shapes: dict[str, tuple[int, ...]],
               examples: Iterable[dict[str, np.ndarray]] = (),
               settings: dict[str, Any] | None = None, **kwargs):
    self._shapes = dict(shapes)
    self._examples = examples
    self._settings = dict(settings or {})
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {key: tfds.features.Tensor(shape=tuple(shape), dtype=np.float32,
                                          encoding=tfds.features.Encoding.BYTES)
                for key, shape in self._shapes.items()}
    return tfds.core.DatasetInfo(
        builder=self, description="Frozen-encoder outputs for IP-Adapter training.",
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(self._settings), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    for index, example in enumerate(self._examples):
      yield index, example


def write_cache(examples: Iterable[dict[str, np.ndarray]], shapes: dict[str, tuple[int, ...]],
                out_dir: str, *, settings: dict[str, Any], name: str = "embedding_cache",
                version: str = CACHE_VERSION) -> str:
  """Writes per-example arrays as `out_dir/name/version/` (ArrayRecord); returns that folder."""
  def body(ns):
    ns.update(name=name, VERSION=tfds.core.Version(version), __module__=__name__,
              RELEASE_NOTES={version: EmbeddingCache.RELEASE_NOTES[CACHE_VERSION]})
  cls = types.new_class(f"EmbeddingCache_{name}", (EmbeddingCache,),
                        {"skip_registration": True}, body)
  builder = cls(shapes=shapes, examples=examples, settings=settings, data_dir=out_dir,
                file_format="array_record")
  if os.path.isdir(builder.data_dir):
    raise FileExistsError(f"{builder.data_dir}: already built; remove it or choose another "
                          "name/version")
  with tempfile.TemporaryDirectory() as downloads:
    builder.download_and_prepare(download_dir=downloads)
  return str(builder.data_dir)


def _encode(graphdef, state, batch: dict[str, jax.Array], *, image_features: str):
  """One batch of preprocessed examples -> the cached arrays (float32)."""
  models = nnx.merge(graphdef, state)
  mean, logvar = models.vae.encode(batch["pixels"])
  context, pooled = encode_text(models.text_encoder, models.text_encoder_2, batch["input_ids"],
                                batch.get("input_ids_2"))
  out = {"latent_mean": mean, "latent_logvar": logvar, "text_context": context,
         CACHE_KEYS[image_features]: encode_image(models.image_encoder, batch["clip_pixels"],
                                                  image_features)}
  if pooled is not None:
    out["text_pooled"] = pooled
  return {key: value.astype(jnp.float32) for key, value in out.items()}


def _encode_empty_text(graphdef, state, ids, ids_2):
  """The "" caption's text states, as condition dropout uses them."""
  models = nnx.merge(graphdef, state)
  context, pooled = encode_text(models.text_encoder, models.text_encoder_2, ids, ids_2)
  out = {"text_context": context[0]}
  if pooled is not None:
    out["text_pooled"] = pooled[0]
  return {key: value.astype(jnp.float32) for key, value in out.items()}


_encode_jit = jax.jit(_encode, static_argnames=("graphdef", "image_features"))
_encode_empty_text_jit = jax.jit(_encode_empty_text, static_argnames=("graphdef",))


def cache_spec(spec: DataSpec, models: StableDiffusion) -> DataSpec:
  """The spec the cache pass preprocesses with: centre crops, and the models' CLIP settings and
  tokenizers wherever the spec leaves them out."""
  if spec.random_crop:
    raise ValueError("the cache stores one crop per image; use random_crop=False")
  tokenizer_2 = spec.tokenizer_2 if spec.tokenizer_2 is not None else models.tokenizer_2
  return dataclasses.replace(
      spec, clip=spec.clip or models.image_processor or CLIPImageConfig(),
      tokenizer=spec.tokenizer if spec.tokenizer is not None else models.tokenizer,
      tokenizer_2=tokenizer_2 if models.is_sdxl else None)


def _pad(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads a short last batch with copies of its first row (one compiled shape)."""
  n = len(next(iter(batch.values())))
  if n == size:
    return batch
  return {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) for k, v in batch.items()}


def build_embedding_cache(source, spec: DataSpec, models: StableDiffusion, out_dir: str, *,
                          image_features: str = "image_embeds", batch_size: int = 16,
                          name: str = "embedding_cache", version: str = CACHE_VERSION,
                          num_threads: int | None = None) -> CacheReport:
  """Runs the frozen encoders over a raw source (`open_source`) and writes the cache.

  image_features: "image_embeds" (basic adapters) or "hidden_states" (the image encoder's
  penultimate hidden states, for Plus and Full-face).
  """
  if image_features not in CACHE_KEYS:
    raise ValueError(f"image_features must be one of {sorted(CACHE_KEYS)}, got "
                     f"{image_features!r}")
  if models.vae is None:
    raise ValueError("the cache stores VAE latents; a pixel-space model (no vae) trains on the "
                     "raw image-text dataset instead")
  if models.image_encoder is None:
    raise ValueError("the cache needs a CLIP image encoder (load_stable_diffusion(..., "
                     "image_encoder=...))")
  if is_cached(source):
    raise ValueError("the source is already an embedding cache")
  spec = cache_spec(spec, models)
  graphdef, state = nnx.split(Networks(vae=models.vae, text_encoder=models.text_encoder,
                                       text_encoder_2=models.text_encoder_2,
                                       image_encoder=models.image_encoder))
  threads = num_threads or min(8, os.cpu_count() or 1)
  batches = iter(grain.MapDataset.source(source).map_with_index(RawExample(spec, seed=0))
                 .batch(batch_size).to_iter_dataset(grain.ReadOptions(
                     num_threads=threads, prefetch_buffer_size=threads)))

  def encoded(batch):
    out = _encode_jit(graphdef, state, _pad(batch, batch_size), image_features=image_features)
    out = {k: np.asarray(v)[:len(batch["pixels"])] for k, v in out.items()}
    out["time_ids"] = batch["time_ids"]
    return out

  first = encoded(next(batches))  # its shapes declare the features
  shapes = {key: value.shape[1:] for key, value in first.items()}

  def examples():
    with tqdm(total=len(source), desc=f"{name}: encoding", unit="img") as bar:
      for out in itertools.chain([first], map(encoded, batches)):
        n = len(out["time_ids"])
        bar.update(n)
        for j in range(n):
          yield {key: value[j] for key, value in out.items()}

  settings = dict(resolution=spec.resolution, image_features=image_features,
                  sdxl=models.is_sdxl, latent_channels=models.vae.config.latent_channels,
                  scaling_factor=models.vae.config.scaling_factor,
                  clip_size=list(spec.clip.crop_size))
  dataset_dir = write_cache(examples(), shapes, out_dir, settings=settings, name=name,
                            version=version)
  ids_2 = tokenize(spec.tokenizer_2, "") if spec.tokenizer_2 is not None else None
  empty = _encode_empty_text_jit(graphdef, state, tokenize(spec.tokenizer, ""), ids_2)
  np.savez(os.path.join(dataset_dir, EMPTY_TEXT_FILE),
           **{key: np.asarray(value) for key, value in empty.items()})
  return CacheReport(dataset_dir=dataset_dir, num_examples=len(source),
                     shapes={k: tuple(v) for k, v in shapes.items()}, settings=settings)


def load_empty_text(out_dir: str) -> dict[str, np.ndarray]:
  """The empty caption's cached states: text_context [T, D] (and text_pooled [P] for SDXL)."""
  path = os.path.join(resolve_dataset_dir(out_dir), EMPTY_TEXT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing; is this an embedding cache folder?")
  with np.load(path) as data:
    return {key: data[key] for key in data.files}
