"""The mesh, batch and FSDP weight rules of training, and their placement on 8 CPU devices."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from ipadapter_jax.train import sharding
from ipadapter_jax.train.step import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = sharding.MIN_SHARDED_SIZE  # elements: the smallest weight that is sharded


def _mesh(data: int, fsdp: int) -> AbstractMesh:
  """A (data, fsdp) mesh of the given size without devices (the rules only read its shape)."""
  return AbstractMesh((data, fsdp), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_make_mesh_takes_every_device_and_fills_in_minus_one():
  devices = jax.devices()[:1]
  for data, fsdp in ((-1, 1), (1, -1), (1, 1)):
    mesh = sharding.make_mesh(data, fsdp, devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
  assert sharding.make_mesh(1, 1, devices=devices).devices.ravel().tolist() == devices


@pytest.mark.parametrize(
  "data,fsdp,message",
  [
    (-1, -1, "at most one of data and fsdp may be -1"),
    (3, 1, "data=3 x fsdp=1 does not use the 8 devices"),
    (3, -1, "data=3 x fsdp=2 does not use the 8 devices"),  # 8 // 3 leaves a remainder
    (-1, 16, "data=0 x fsdp=16 does not use the 8 devices"),
    (-8, -1, "does not use the 8 devices"),
    (0, 8, "data=0 x fsdp=8 does not use the 8 devices"),
  ],
)
def test_make_mesh_refuses_a_shape_that_does_not_use_the_devices(data, fsdp, message):
  devices = [object()] * 8  # refused before any device is touched
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    sharding.make_mesh(data, fsdp, devices=devices)


def test_batch_is_split_over_both_axes():
  spec = sharding.batch_sharding(_mesh(4, 2)).spec
  assert spec == P(("data", "fsdp")) and sharding.replicated(_mesh(4, 2)).spec == P()


@pytest.mark.parametrize(
  "shape,spec",
  [
    ((512, 256), P("fsdp", None)),  # the largest axis
    ((256, 512), P(None, "fsdp")),
    ((3, 3, 64, 512), P(None, None, None, "fsdp")),
    ((513, 256), P(None, "fsdp")),  # the largest is odd: the largest one that divides
    ((256, 256), P("fsdp", None)),  # a tie: the first of them
    ((BIG,), P("fsdp")),  # exactly the threshold is sharded
    ((BIG - 2,), P()),  # one below it is replicated, though it divides
    ((257, 257), P()),  # big enough, but no axis divides
    ((4, 4), P()),
    ((), P()),
  ],
)
def test_weight_sharding_splits_the_largest_divisible_axis_over_fsdp(shape, spec):
  assert sharding.weight_sharding(_mesh(4, 2), shape, True).spec == spec


def test_weight_sharding_replicates_when_not_asked_or_fsdp_is_one():
  assert sharding.weight_sharding(_mesh(4, 2), (512, 256), False).spec == P()
  assert sharding.weight_sharding(_mesh(8, 1), (512, 256), True).spec == P()
  assert sharding.weight_sharding(_mesh(2, 4), (6, BIG // 2), True).spec == P(None, "fsdp")
  # fsdp=4 divides neither axis
  assert sharding.weight_sharding(_mesh(2, 4), (BIG // 2 + 2, 6), True).spec == P()


def test_tree_shardings_follows_the_tree_of_shape_dtype_structs():
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  params = {"down": {"kernel": f32(64, 2048), "bias": f32(2048)}, "proj": [f32(1024, 96)]}
  state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, (params,), None)
  out = sharding.tree_shardings(_mesh(2, 2), state, True)
  assert isinstance(out, TrainState) and out.ema is None  # None is no leaf: it stays None
  specs = {k: out.params["down"][k].spec for k in ("kernel", "bias")}
  assert specs == {"kernel": P(None, "fsdp"), "bias": P()}
  assert out.params["proj"][0].spec == P("fsdp", None) and out.step.spec == P()
  assert out.opt_state[0]["down"]["kernel"].spec == P(None, "fsdp")
  replicated = sharding.tree_shardings(_mesh(2, 2), state, False)
  assert {s.spec for s in jax.tree.leaves(replicated)} == {P()}


PLACEMENT = r"""
import json
import jax
import numpy as np
from ipadapter_jax.train import sharding

assert len(jax.devices()) == 8, jax.devices()
out = {"meshes": [dict(sharding.make_mesh(d, f).shape) for d, f in ((-1, 2), (4, -1), (-1, 1))]}
mesh = sharding.make_mesh(4, 2)
weight = np.arange(512 * 256, dtype=np.float32).reshape(512, 256)
small = np.arange(64, dtype=np.float32).reshape(8, 8)
batch = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
for name, x, s in (("weight", weight, sharding.weight_sharding(mesh, weight.shape, True)),
                   ("small", small, sharding.weight_sharding(mesh, small.shape, True)),
                   ("batch", batch, sharding.batch_sharding(mesh))):
  y = jax.device_put(x, s)
  shards = y.addressable_shards
  out[name] = {"shapes": [list(sh.data.shape) for sh in shards],
               "devices": len({sh.device for sh in shards}),
               "slices_match": all(np.array_equal(np.asarray(sh.data), x[sh.index])
                                   for sh in shards),
               "starts": sorted({sl.start or 0 for sh in shards for sl in sh.index[:1]}),
               "whole": bool(np.array_equal(np.asarray(y), x))}
print(json.dumps(out))
"""


def test_device_put_really_splits_the_arrays_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", PLACEMENT],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["meshes"] == [{"data": 4, "fsdp": 2}, {"data": 4, "fsdp": 2}, {"data": 8, "fsdp": 1}]
  for name in ("weight", "small", "batch"):
    assert out[name]["devices"] == 8 and out[name]["slices_match"] and out[name]["whole"], name
  # The weight's 512 rows in two halves over fsdp (each half on the 4 data devices).
  assert out["weight"]["shapes"] == [[256, 256]] * 8 and out["weight"]["starts"] == [0, 256]
  assert out["small"]["shapes"] == [[8, 8]] * 8 and out["small"]["starts"] == [0]
  # 16 examples, 2 on every device, none twice.
  assert out["batch"]["shapes"] == [[2, 3]] * 8
  assert out["batch"]["starts"] == list(range(0, 16, 2))
