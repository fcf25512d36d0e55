"""The adapter alone as an Orbax checkpoint: the JAX side of `convert to-jax` / `to-official`.

A folder with `adapter_config.json` (the adapter's shape and the UNet config it belongs to) and
an Orbax item `adapter`: a flat {"module.path.kernel": array} dict of every AdapterParam.
A training work directory has the same config file and stores the trainable weights the same
way (`checkpoints/STEP/params`), so `load_adapter_checkpoint` opens both (the latest finalized
step).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ipadapter_jax import storage
from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
from ipadapter_jax.weights.files import CheckpointError

CONFIG_NAME = "adapter_config.json"
ITEM = "adapter"


def adapter_arrays(model: UNet2DConditionModel) -> dict[str, jax.Array]:
  """{"dotted.module.path.leaf": array} for every adapter weight."""
  return {".".join(map(str, path)): variable.get_value()
          for path, variable in nnx.to_flat_state(nnx.state(model, AdapterParam))}


def adapter_metadata(model: UNet2DConditionModel) -> dict:
  return {"adapter": dataclasses.asdict(model.adapter_config),
          "unet": model.config.to_diffusers()}


def save_adapter_checkpoint(model: UNet2DConditionModel, directory: str) -> None:
  """Writes the adapter (float32) and its config; the folder counts only once complete."""
  directory = storage.resolve(directory)
  if storage.is_remote(directory):
    # Object stores cannot rename a folder: Orbax writes there directly and commits the item
    # itself, and the config, written last, is what makes the folder an adapter checkpoint.
    _write_adapter(model, directory)
    return
  with storage.staged(directory) as tmp:
    _write_adapter(model, tmp)


def _write_adapter(model: UNet2DConditionModel, directory: str) -> None:
  config = storage.join(directory, CONFIG_NAME)
  storage.remove(config)  # an older checkpoint being replaced no longer counts
  storage.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(storage.join(directory, ITEM), adapter_arrays(model), force=True)
  checkpointer.wait_until_finished()
  storage.write_text(config, json.dumps(adapter_metadata(model), indent=2))


def abstract_unet_for(directory: str) -> UNet2DConditionModel:
  """An abstract (unallocated) UNet with the adapter described by a checkpoint's config."""
  path = storage.join(directory, CONFIG_NAME)
  if not storage.exists(path) or storage.isdir(path):
    raise CheckpointError(f"{directory}: not an adapter checkpoint ({CONFIG_NAME} is missing)")
  meta = json.loads(storage.read_text(path))
  config = UNetConfig.from_diffusers(meta["unet"], source=path)
  adapter = AdapterConfig(**meta["adapter"])
  return nnx.eval_shape(lambda: UNet2DConditionModel(config, adapter=adapter, rngs=nnx.Rngs(0)))


def _weights_item(directory: str) -> str:
  """The Orbax item holding the adapter: `adapter/`, or a training run's latest `params/`."""
  directory = storage.resolve(directory)
  if storage.isdir(storage.join(directory, ITEM)):
    return storage.join(directory, ITEM)
  steps = storage.join(directory, "checkpoints")
  # Orbax's own test of a finished save: a step folder still being written (on an object store
  # it has its final name from the start) is not one.
  finalized = ocp.path.step.checkpoint_steps(steps) if storage.isdir(steps) else []
  if finalized:
    return storage.join(steps, str(max(finalized)), "params")
  raise CheckpointError(f"{directory}: neither an adapter checkpoint ('{ITEM}/') nor a training "
                        "run with checkpoints")


def load_adapter_checkpoint(model: UNet2DConditionModel, directory: str) -> None:
  """Sets `model`'s adapter from a checkpoint folder or a training run; mismatches are errors."""
  item = _weights_item(directory)
  target = adapter_arrays(model)
  try:
    stored = ocp.StandardCheckpointer().metadata(item).item_metadata.tree
  except Exception as e:  # orbax raises several types for unreadable checkpoints
    raise CheckpointError(f"{directory}: unreadable checkpoint ({type(e).__name__}: {e})") from None
  missing = sorted(set(target) - set(stored))
  base = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  unexpected = sorted(set(stored) - base)  # a run that trained the UNet too also stores it
  if missing or unexpected:
    key = (missing or unexpected)[0]
    raise CheckpointError(f"{directory}: {'missing' if missing else 'unexpected'} adapter "
                          f"weight '{key}' for this model")
  for key, value in target.items():
    if tuple(stored[key].shape) != tuple(value.shape):
      raise CheckpointError(f"{directory}: adapter weight '{key}' has shape "
                            f"{list(stored[key].shape)}, expected {list(value.shape)}")
  abstract = {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in stored.items()}
  restored = ocp.StandardCheckpointer().restore(item, abstract)
  variables = dict(nnx.to_flat_state(nnx.state(model, AdapterParam)))
  for path, variable in variables.items():
    variable.set_value(restored[".".join(map(str, path))])
