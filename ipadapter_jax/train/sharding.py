"""Every sharding rule of training in one place: the (data, fsdp) mesh, the batch, the weights."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2**16  # smaller weights are replicated: sharding them only costs gathers


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over all devices; -1 takes the devices the other axis leaves."""
  n = len(devices if devices is not None else jax.devices())
  if data == -1 and fsdp == -1:
    raise ValueError("mesh: at most one of data and fsdp may be -1")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n or data < 1 or fsdp < 1:
    raise ValueError(f"mesh: data={data} x fsdp={fsdp} does not use the {n} devices")
  kw = {} if devices is None else {"devices": devices}
  return jax.make_mesh(
    (data, fsdp), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, **kw
  )


def batch_sharding(mesh) -> NamedSharding:
  """Examples split over every device (both mesh axes)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def weight_sharding(mesh, shape, shard: bool) -> NamedSharding:
  """FSDP: the largest axis divisible by the fsdp size is split over it; else replicated."""
  fsdp = mesh.shape["fsdp"]
  if not shard or fsdp == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
    return replicated(mesh)
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def tree_shardings(mesh, tree, shard: bool):
  """The sharding of every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: weight_sharding(mesh, x.shape, shard), tree)


def abstract(tree, shardings):
  """`tree`'s arrays as ShapeDtypeStructs carrying `shardings` (a tree like it, or one for all),
  as placed arrays do: a restore target, or the arguments of a compile-only program (the
  attention kernels read the mesh from their inputs' type)."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )
