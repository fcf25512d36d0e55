"""The compiled train step as a run builds it: the trainable / frozen split, the optimizer, the
train state created in place with its shardings, and the step jitted with the mesh's shardings.

`train/loop.py`, the sharded-step test and `benchmarks/speed.py` all build their step here, so
what they check and time is the step a run executes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import optax
from flax import nnx

from ipadapter_jax.train import sharding
from ipadapter_jax.train.step import (
  StepSpec,
  TrainState,
  init_state,
  make_optimizer,
  train_step,
  trainable_filter,
)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """Everything the step needs besides its inputs, and the shardings of those inputs."""

  graphdef: Any
  spec: StepSpec
  optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  state_shardings: Any
  frozen_shardings: Any

  @property
  def ema(self) -> bool:
    return self.spec.ema_decay > 0

  @property
  def replicated(self):
    return sharding.replicated(self.mesh)

  def init_state(self, params) -> TrainState:
    """The train state, created directly in its shards on the devices."""
    return jax.jit(
      functools.partial(init_state, optimizer=self.optimizer, ema=self.ema),
      out_shardings=self.state_shardings,
    )(params)

  def place_frozen(self, frozen):
    return jax.device_put(frozen, self.frozen_shardings)

  def step(self, batch_example, *, donate: bool = True):
    """The jitted step (state, frozen, batch, empty, key) -> (state, outputs), for batches
    shaped like `batch_example` (a dict of arrays or ShapeDtypeStructs), compiled for the
    mesh's devices (also when they are another platform's, e.g. a TPU topology's)."""
    batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(self.mesh), batch_example)
    step = functools.partial(
      train_step, graphdef=self.graphdef, spec=self.spec, optimizer=self.optimizer
    )
    return jax.jit(
      step,
      in_shardings=(
        self.state_shardings,
        self.frozen_shardings,
        batch_shardings,
        self.replicated,
        self.replicated,
      ),
      out_shardings=(self.state_shardings, self.replicated),
      donate_argnums=(0,) if donate else (),
    )


def build_program(
  networks,
  spec: StepSpec,
  mesh,
  *,
  trainable: str,
  optimizer,
  shard_trainable: bool,
  shard_frozen: bool,
):
  """(program, trainable params, frozen weights) for `networks` (a `Networks` graph) trained as
  `trainable` says; the weights stay where they are (see `TrainProgram.init_state` and
  `place_frozen`)."""
  graphdef, params, frozen = nnx.split(networks, trainable_filter(trainable), ...)
  abstract_state = jax.eval_shape(
    functools.partial(init_state, optimizer=optimizer, ema=spec.ema_decay > 0), params
  )
  program = TrainProgram(
    graphdef=graphdef,
    spec=spec,
    optimizer=optimizer,
    mesh=mesh,
    state_shardings=sharding.tree_shardings(mesh, abstract_state, shard_trainable),
    frozen_shardings=sharding.tree_shardings(mesh, frozen, shard_frozen),
  )
  return program, params, frozen


def program_from_config(cfg, networks, spec: StepSpec, mesh, *, optimizer=None):
  """`build_program` with a run config's settings; `optimizer` (default: the config's, with its
  schedule over `cfg.num_steps`) may be replaced, e.g. by plain SGD to read gradients back."""
  return build_program(
    networks,
    spec,
    mesh,
    trainable=cfg.model.trainable,
    optimizer=optimizer or make_optimizer(cfg.optimizer, cfg.num_steps),
    shard_trainable=cfg.mesh.shard_trainable,
    shard_frozen=cfg.mesh.shard_frozen,
  )
