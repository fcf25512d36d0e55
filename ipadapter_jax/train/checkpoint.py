"""Orbax checkpoints of the trainable state only, restorable onto any mesh.

Each step folder holds three items:
  params  the trainable weights as {"down_blocks.0.....to_k_ip.kernel": array} (paths inside the
          UNet: the same layout as an adapter checkpoint, so `convert to-official` reads both);
  state   the step, the optimizer state and the EMA, as one flat dict of arrays;
  data    the input iterator's position (JSON).
The frozen models are never saved: they come from their own folders at every start.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from ipadapter_jax import storage
from ipadapter_jax.weights.files import CheckpointError


def _dotted(path) -> str:
  """A pytree path as "a.0.b" (a Variable's own `.value` step is left out)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
      parts.append(key.name)
  return ".".join(parts)


def to_flat(tree, drop_prefix: int = 0) -> dict:
  """{"dotted.path": leaf} of a pytree; `drop_prefix` leading path parts are left out."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(_dotted(path).split(".")[drop_prefix:]): leaf for path, leaf in leaves}


def from_flat(flat: dict, like, drop_prefix: int = 0):
  """The inverse of `to_flat`, shaped like `like`."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  keys = [".".join(_dotted(path).split(".")[drop_prefix:]) for path, _ in leaves]
  return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


def _split(state):
  """(params inside the UNet, everything else) of a TrainState."""
  return to_flat(state.params, drop_prefix=1), to_flat(state._replace(params=None))


class Checkpoints:
  """Saves asynchronously; keeps the last `keep_last` and every `keep_every`-th step."""

  def __init__(
    self, directory: str, *, keep_last: int, keep_every: int = 0, asynchronous: bool = True
  ):
    directory = storage.resolve(directory)  # Orbax wants absolute local paths or URIs
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep_last,
      keep_period=keep_every or None,
      enable_async_checkpointing=asynchronous,
      create=True,
    )
    self.manager = ocp.CheckpointManager(directory, options=options)
    self.directory = directory

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    params, rest = _split(state)
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        state=ocp.args.StandardSave(rest),
        data=ocp.args.JsonSave(data_state),
      ),
      force=force,
    )

  def restore(self, step: int, abstract_state):
    """(state, data_state) of `step`, laid out as `abstract_state`'s leaves (with shardings)."""
    params, rest = _split(abstract_state)
    try:
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          params=ocp.args.StandardRestore(params),
          state=ocp.args.StandardRestore(rest),
          data=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # orbax raises many types; a failed restore must never pass silently
      reason = " ".join(str(e).split())[:500]
      earlier = [s for s in self.manager.all_steps() if s < step]
      hint = (
        f"; to resume from step {max(earlier)} before it, move "
        f"{storage.join(self.directory, str(step))} out of {self.directory} and run again"
        if earlier
        else ""
      )
      raise CheckpointError(
        f"{self.directory}: cannot restore step {step} onto this run "
        f"({type(e).__name__}: {reason}){hint}"
      ) from None
    state = from_flat(restored.state, abstract_state._replace(params=None))
    return state._replace(
      params=from_flat(restored.params, abstract_state.params, drop_prefix=1)
    ), restored.data

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
