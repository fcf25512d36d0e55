"""The adapter alone as an Orbax checkpoint: the JAX side of `convert to-jax` / `to-official`.

A folder with `adapter_config.json` (the adapter's shape and the UNet config it belongs to) and
an Orbax item `adapter`: a flat {"module.path.kernel": array} dict of every AdapterParam.
A training work directory has the same config file and stores the trainable weights the same
way (`checkpoints/STEP/params`), so `load_adapter_checkpoint` opens both (the latest step).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
from ipadapter_jax.weights.files import CheckpointError, atomic_path

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
  """Writes the adapter (float32) and its config; the folder appears only when complete."""
  with atomic_path(directory) as tmp:
    os.makedirs(tmp)
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(adapter_metadata(model), f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(os.path.abspath(tmp), ITEM), adapter_arrays(model))
    checkpointer.wait_until_finished()


def abstract_unet_for(directory: str) -> UNet2DConditionModel:
  """An abstract (unallocated) UNet with the adapter described by a checkpoint's config."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory}: not an adapter checkpoint ({CONFIG_NAME} is missing)")
  with open(path) as f:
    meta = json.load(f)
  config = UNetConfig.from_diffusers(meta["unet"], source=path)
  adapter = AdapterConfig(**meta["adapter"])
  return nnx.eval_shape(lambda: UNet2DConditionModel(config, adapter=adapter, rngs=nnx.Rngs(0)))


def _weights_item(directory: str) -> str:
  """The Orbax item holding the adapter: `adapter/`, or a training run's latest `params/`."""
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, ITEM)):
    return os.path.join(directory, ITEM)
  steps = os.path.join(directory, "checkpoints")
  numbered = sorted((int(d) for d in os.listdir(steps) if d.isdigit()) if os.path.isdir(steps)
                    else [])
  if numbered:
    return os.path.join(steps, str(numbered[-1]), "params")
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
