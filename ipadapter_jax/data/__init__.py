"""Input data: image-text datasets (imagefolder, webdataset shards, TFDS / ArrayRecord), the
input pipeline (grain for random-access sources, a resumable stream for shards) and the
embedding cache (docs/data.md). (Per-example preprocessing and tokenization, which the model
loaders use too, are `ipadapter_jax.preprocessing` and `ipadapter_jax.tokenizer`.)

The names are imported on first use, so that importing one module of the package does not pull
in tensorflow-datasets and grain.
"""

import importlib

_EXPORTS = {
  "BuildReport": "image_text",
  "ImageTextFolder": "image_text",
  "build_image_text_dataset": "image_text",
  "read_annotations": "image_text",
  "DataSpec": "input_pipeline",
  "TrainIterator": "input_pipeline",
  "make_train_iterator": "batches",
  "open_source": "input_pipeline",
  "source_format": "input_pipeline",
  "CacheReport": "cache",
  "build_embedding_cache": "cache",
  "load_empty_text": "cache",
  "CacheSource": "cache_files",
  "ImageFolderSource": "imagefolder",
  "WebDatasetSource": "tar_shards",
  "StreamIterator": "streaming",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  """Imports an exported name's module when the name is first used."""
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
