"""The adapter alone as an Orbax checkpoint: the JAX side of `convert to-jax` / `to-official`.

A folder with `adapter_config.json` (the adapter's shape and the UNet config it belongs to) and
an Orbax item `adapter`: a flat {"module.path.kernel": array} dict of every AdapterParam.
A training work directory has the same config file and stores the trainable weights the same
way (`checkpoints/STEP/params`), and their EMA, when the run keeps one, in `checkpoints/STEP/state`
under `ema.unet.`; `load_adapter_checkpoint` opens both, and from a run takes what the run itself
exports (`train.outputs.export`): the EMA when there is one, else the weights, of a finalized step.
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
# Where a run's `state` item keeps the EMA of the UNet's trainable weights (train.checkpoint).
EMA_PREFIX = "ema.unet."
# The dtype of an official adapter file unless asked otherwise: a run's own export and
# `convert to-official` both write the trained float32 weights as they are.
EXPORT_DTYPE = "float32"


def adapter_arrays(model: UNet2DConditionModel) -> dict[str, jax.Array]:
  """{"dotted.module.path.leaf": array} for every adapter weight."""
  return {
    ".".join(map(str, path)): variable.get_value()
    for path, variable in nnx.to_flat_state(nnx.state(model, AdapterParam))
  }


def adapter_metadata(model: UNet2DConditionModel) -> dict:
  return {"adapter": dataclasses.asdict(model.adapter_config), "unet": model.config.to_diffusers()}


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


def run_steps(directory: str) -> list[int]:
  """A training run's finalized checkpoint steps, in order (none for anything else).

  Orbax's own test of a finished save: a step folder still being written (on an object store
  it has its final name from the start) is not one."""
  steps = storage.join(storage.resolve(directory), "checkpoints")
  return sorted(ocp.path.step.checkpoint_steps(steps)) if storage.isdir(steps) else []


def _checkpoint_step(directory: str, step: int | None) -> int | None:
  """None for an adapter checkpoint (`adapter/`); for a training run `step`, checked, or its
  latest finalized step."""
  if storage.isdir(storage.join(directory, ITEM)):
    if step is not None:
      raise CheckpointError(
        f"{directory}: an adapter checkpoint has no steps (a step picks a "
        "checkpoint of a training run)"
      )
    return None
  finalized = run_steps(directory)
  if not finalized:
    raise CheckpointError(
      f"{directory}: neither an adapter checkpoint ('{ITEM}/') nor a training run with checkpoints"
    )
  if step is None:
    return finalized[-1]
  if step not in finalized:
    raise CheckpointError(
      f"{directory}: no finalized checkpoint at step {step}; its steps are "
      f"{', '.join(map(str, finalized))}"
    )
  return step


def _weights_item(directory: str, step: int | None = None) -> str:
  """The Orbax item holding the adapter's weights: `adapter/`, or a training run's `params/` of
  `step` (default: the latest finalized one)."""
  directory = storage.resolve(directory)
  chosen = _checkpoint_step(directory, step)
  if chosen is None:
    return storage.join(directory, ITEM)
  return storage.join(directory, "checkpoints", str(chosen), "params")


def _stored(directory: str, item: str) -> dict:
  """{key: metadata} of an Orbax item."""
  try:
    return ocp.StandardCheckpointer().metadata(item).item_metadata.tree
  except Exception as e:  # orbax raises several types for unreadable checkpoints
    raise CheckpointError(f"{directory}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def _exported_source(directory: str, step: int | None) -> tuple[str, str, dict, str]:
  """(item, key prefix, its {key: metadata}, a description) of the weights a run exports at
  `step`: the EMA when its state holds one, else the weights; an adapter checkpoint's own."""
  directory = storage.resolve(directory)
  step = _checkpoint_step(directory, step)
  weights = _weights_item(directory, step)
  if step is None:
    return weights, "", _stored(directory, weights), "adapter checkpoint"
  state = storage.join(directory, "checkpoints", str(step), "state")
  ema = {
    k[len(EMA_PREFIX) :]: v
    for k, v in _stored(directory, state).items()
    if k.startswith(EMA_PREFIX)
  }
  if ema:
    return state, EMA_PREFIX, ema, f"step {step}, EMA"
  return weights, "", _stored(directory, weights), f"step {step}, no EMA"


def load_adapter_checkpoint(
  model: UNet2DConditionModel, directory: str, *, step: int | None = None
) -> str:
  """Sets `model`'s adapter from a checkpoint folder or from a training run's `step` (default:
  its latest finalized one; the EMA when the run keeps one, as the run exports); mismatches
  are errors. Returns what was read ("step 6, EMA", ...)."""
  item, prefix, stored, source = _exported_source(directory, step)
  target = adapter_arrays(model)
  missing = sorted(set(target) - set(stored))
  base = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  unexpected = sorted(set(stored) - base)  # a run that trained the UNet too also stores it
  if missing or unexpected:
    key = (missing or unexpected)[0]
    raise CheckpointError(
      f"{directory}: {'missing' if missing else 'unexpected'} adapter weight '{key}' for this model"
    )
  for key, value in target.items():
    if tuple(stored[key].shape) != tuple(value.shape):
      raise CheckpointError(
        f"{directory}: adapter weight '{key}' has shape "
        f"{list(stored[key].shape)}, expected {list(value.shape)}"
      )
  # Only the adapter's arrays are read: not the optimizer's state, nor a trained UNet's rest.
  abstract = {
    prefix + k: jax.ShapeDtypeStruct(tuple(stored[k].shape), stored[k].dtype) for k in target
  }
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
      item,
      args=ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,
      ),
    )
  variables = dict(nnx.to_flat_state(nnx.state(model, AdapterParam)))
  for path, variable in variables.items():
    variable.set_value(restored[prefix + ".".join(map(str, path))])
  return source
