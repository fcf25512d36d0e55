"""Runs one train step on 8 CPU devices sharded data=4 x fsdp=2 and on one device; prints both.

Run by tests/test_train.py in a subprocess (the device count must be set before jax starts).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from ipadapter_jax.train import sharding  # noqa: E402
from ipadapter_jax.train.loop import empty_conditions, load_models, step_spec  # noqa: E402
from ipadapter_jax.train.step import TrainState, make_optimizer, train_step, trainable_filter  # noqa: E402


def run(cfg, mesh, batch):
  sd = load_models(cfg)
  spec = step_spec(cfg, sd)
  modules = (sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2, sd.image_encoder)
  graphdef, params, frozen = nnx.split(modules, trainable_filter(cfg.model.trainable), ...)
  optimizer = make_optimizer(cfg.optimizer, cfg.num_steps)
  state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), None)
  state_sh = sharding.tree_shardings(mesh, state, True)
  frozen_sh = sharding.tree_shardings(mesh, frozen, True)
  state, frozen = jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  empty = jax.device_put(empty_conditions(cfg, sd, spec), sharding.replicated(mesh))
  step = jax.jit(lambda s, f, b, e, k: train_step(s, f, b, e, k, graphdef=graphdef, spec=spec,
                                                   optimizer=optimizer),
                 in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh),
                               sharding.replicated(mesh), sharding.replicated(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)))
  key = jax.random.key(0)
  state, out = step(state, frozen, batch, empty, key)
  flat = {".".join(map(str, p)): np.asarray(v.get_value()).tolist()
          for p, v in nnx.to_flat_state(state.params)}
  return float(out["loss"]), flat


def main(config_json, batch_npz, out_json):
  cfg = ml_collections.ConfigDict(json.loads(open(config_json).read()))
  batch = dict(np.load(batch_npz))
  sharded = run(cfg, sharding.make_mesh(4, 2), batch)
  single = run(cfg, sharding.make_mesh(1, 1, devices=jax.devices()[:1]), batch)
  with open(out_json, "w") as f:
    json.dump({"sharded": sharded, "single": single}, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
