"""One train step's gradients and SGD update on 8 CPU devices (data=4 x fsdp=2, trainable and
frozen weights sharded over fsdp) and on one device; writes both as JSON. The step is the one
train.py's loop builds (`train.program`), with SGD so that the update is the gradient, scaled.

Run by tests/test_train.py in a subprocess (the device count must be set before jax starts).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from ipadapter_jax.train import sharding  # noqa: E402
from ipadapter_jax.train.loading import empty_conditions, load_models, step_spec  # noqa: E402
from ipadapter_jax.train.program import program_from_config  # noqa: E402
from ipadapter_jax.train.step import loss_fn  # noqa: E402

sharding.MIN_SHARDED_SIZE = 0  # the tiny weights would all be replicated otherwise


def _flat(tree) -> dict:
  return {
    ".".join(map(str, p)): np.asarray(v.get_value()).tolist() for p, v in nnx.to_flat_state(tree)
  }


def run(cfg, mesh, batch):
  sd = load_models(cfg)
  spec = step_spec(cfg, sd, cached=False)
  program, params, frozen = program_from_config(
    cfg, sd.networks(), spec, mesh, optimizer=optax.sgd(cfg.optimizer.learning_rate)
  )
  state, frozen = program.init_state(params), program.place_frozen(frozen)
  state_sh, frozen_sh = program.state_shardings, program.frozen_shardings
  batch_sh, replicated = sharding.batch_sharding(mesh), program.replicated
  batch = jax.device_put(batch, batch_sh)
  empty = jax.device_put(empty_conditions(cfg, sd, spec), replicated)
  key = jax.random.key(0)
  split = sorted(
    ".".join(map(str, p))
    for p, v in nnx.to_flat_state(state.params)
    if v.get_value().addressable_shards[0].data.shape != v.get_value().shape
  )
  grad = jax.jit(
    jax.grad(loss_fn),
    static_argnums=(2, 6),
    in_shardings=(state_sh.params, frozen_sh, batch_sh, replicated, replicated),
    out_shardings=state_sh.params,
  )
  grads = grad(
    state.params, frozen, program.graphdef, batch, empty, jax.random.fold_in(key, 0), spec
  )
  state, out = program.step(batch, donate=False)(state, frozen, batch, empty, key)
  return {
    "loss": float(out["loss"]),
    "grad_norm": float(out["grad_norm"]),
    "grads": _flat(grads),
    "params": _flat(state.params),
    "split": split,
  }


def main(config_json, batch_npz, out_json):
  cfg = ml_collections.ConfigDict(json.loads(open(config_json).read()))
  cfg.mesh.shard_trainable = cfg.mesh.shard_frozen = True
  batch = dict(np.load(batch_npz))
  sharded = run(cfg, sharding.make_mesh(4, 2), batch)
  single = run(cfg, sharding.make_mesh(1, 1, devices=jax.devices()[:1]), batch)
  with open(out_json, "w") as f:
    json.dump({"sharded": sharded, "single": single}, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
