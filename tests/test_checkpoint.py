"""Orbax checkpoints of the train state: flat layouts, save and restore, retention, failures."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from ipadapter_jax.train.checkpoint import Checkpoints, from_flat, to_flat
from ipadapter_jax.train.step import TrainState, init_state
from ipadapter_jax.weights.files import CheckpointError


class _Networks(nnx.Module):
  """A stand-in for `Networks`: the trainable weights live under `unet`."""

  def __init__(self, rngs):
    self.unet = _UNet(rngs)


class _UNet(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Linear(3, 4, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(4, 2, rngs=rngs)])


def _state(seed: int = 0) -> TrainState:
  params = nnx.state(_Networks(nnx.Rngs(seed)), nnx.Param)
  state = init_state(params, optimizer=optax.adam(1e-3), ema=True)
  # Distinct values in every part, so that a mixed-up restore shows.
  return state._replace(
    step=jnp.asarray(7, jnp.int32),
    ema=jax.tree.map(lambda x: x + 0.5, state.ema),
    opt_state=jax.tree.map(lambda x: x + 3, state.opt_state),
  )


def _abstract(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_to_flat_names_leaves_by_dotted_path_and_from_flat_inverts_it():
  tree = {"a": {"b": np.ones(2), "c": [np.zeros(1), np.full(3, 2.0)]}, "d": np.arange(4)}
  flat = to_flat(tree)
  assert sorted(flat) == ["a.b", "a.c.0", "a.c.1", "d"]
  np.testing.assert_array_equal(flat["a.c.1"], np.full(3, 2.0))
  assert sorted(to_flat({"unet": tree["a"]}, drop_prefix=1)) == ["b", "c.0", "c.1"]
  back = from_flat(flat, tree)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(x, y)
  # nnx.State: a Variable's own `.value` step is not part of the name.
  params = _state().params
  flat = to_flat(params, drop_prefix=1)
  assert sorted(flat) == ["blocks.0.bias", "blocks.0.kernel", "proj.bias", "proj.kernel"]
  assert flat["proj.kernel"].shape == (3, 4)
  back = from_flat({k: v + 1 for k, v in flat.items()}, params, drop_prefix=1)
  assert isinstance(back, nnx.State)
  np.testing.assert_array_equal(
    back["unet"]["proj"]["kernel"].get_value(), params["unet"]["proj"]["kernel"].get_value() + 1
  )
  with pytest.raises(KeyError):
    from_flat({"proj.kernel": flat["proj.kernel"]}, params, drop_prefix=1)


def test_save_then_restore_gives_back_the_state_and_the_data_position(tmp_path):
  state = _state()
  checkpoints = Checkpoints(str(tmp_path / "ckpt"), keep_last=3)
  assert checkpoints.latest_step() is None
  assert checkpoints.save(5, state, {"position": 11, "epoch": [1, 2]}, force=True)
  checkpoints.wait()
  assert checkpoints.latest_step() == 5
  assert {"data", "params", "state"} <= set(os.listdir(tmp_path / "ckpt" / "5"))
  # The params item is laid out as inside the UNet, like an adapter checkpoint.
  saved = ocp.StandardCheckpointer().metadata(str(tmp_path / "ckpt" / "5" / "params")).item_metadata
  assert sorted(saved) == ["blocks.0.bias", "blocks.0.kernel", "proj.bias", "proj.kernel"]
  assert saved["proj.kernel"].shape == (3, 4)
  checkpoints.close()

  restored, data = Checkpoints(str(tmp_path / "ckpt"), keep_last=3).restore(
    5, _abstract(_state(seed=1))
  )  # other values, the same layout
  assert isinstance(restored, TrainState) and isinstance(restored.params, nnx.State)
  assert data == {"position": 11, "epoch": [1, 2]}
  assert int(restored.step) == 7
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for got, want in zip(_leaves(restored), _leaves(state)):
    np.testing.assert_array_equal(got, want)


def test_keep_last_deletes_older_steps_and_keep_every_keeps_multiples(tmp_path):
  state = _state()
  last = Checkpoints(str(tmp_path / "last"), keep_last=2, asynchronous=False)
  every = Checkpoints(str(tmp_path / "every"), keep_last=1, keep_every=2, asynchronous=False)
  for step in range(1, 6):
    for checkpoints in (last, every):
      checkpoints.save(step, state, {"step": step}, force=True)
  for checkpoints in (last, every):
    checkpoints.wait()
  assert sorted(last.manager.all_steps()) == [4, 5]
  assert sorted(every.manager.all_steps()) == [2, 4, 5]
  assert sorted(int(d) for d in os.listdir(tmp_path / "last") if d.isdigit()) == [4, 5]
  assert last.latest_step() == every.latest_step() == 5
  _, data = last.restore(4, _abstract(state))
  assert data == {"step": 4}
  last.close()
  every.close()


def test_a_relative_directory_is_resolved(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  checkpoints = Checkpoints("run/checkpoints", keep_last=1, asynchronous=False)
  checkpoints.save(1, _state(), {}, force=True)
  checkpoints.close()
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "1")


class _OneWeight(nnx.Module):
  def __init__(self, rngs):
    self.unet = nnx.Linear(3, 4, use_bias=False, rngs=rngs)


def test_restore_onto_a_wrong_shape_is_one_line_naming_the_directory(tmp_path):
  # One array in all: a failed Orbax restore abandons the other reads it has in flight.
  state = init_state(
    nnx.state(_OneWeight(nnx.Rngs(0)), nnx.Param), optimizer=optax.sgd(0.1), ema=False
  )
  directory = str(tmp_path / "ckpt")
  checkpoints = Checkpoints(directory, keep_last=1, asynchronous=False)
  checkpoints.save(3, state, {}, force=True)
  wrong = _abstract(state)
  kernel = wrong.params["unet"]["kernel"]
  kernel.set_value(jax.ShapeDtypeStruct((5, 4), jnp.float32, sharding=kernel.get_value().sharding))
  with pytest.raises(CheckpointError) as info:
    checkpoints.restore(3, wrong)
  message = str(info.value)
  assert message.startswith(f"{directory}: cannot restore step 3 onto this run (")
  assert "\n" not in message and len(message) < 700
  with pytest.raises(CheckpointError, match="cannot restore step 4"):  # a step never saved
    checkpoints.restore(4, _abstract(state))
  restored, _ = checkpoints.restore(3, _abstract(state))  # the right shape still restores
  np.testing.assert_array_equal(
    restored.params["unet"]["kernel"].get_value(), state.params["unet"]["kernel"].get_value()
  )
  checkpoints.close()
