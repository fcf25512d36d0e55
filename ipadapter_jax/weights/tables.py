"""Mechanical PyTorch <-> Flax parameter mapping, and strict assignment into NNX models.

A model's key table is a function from a Flax parameter path to the PyTorch name; the layout of
each tensor follows from its Flax leaf name and rank: Linear kernels [in, out] <-> weight
[out, in]; convolution kernels HWIO <-> OIHW; LayerNorm/GroupNorm `scale` and Embed `embedding`
<-> `weight`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.weights.files import CheckpointError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_name(path: tuple, renames: Iterable[tuple[str, str]] = ()) -> str:
  """`('down_blocks', 0, 'attentions', 1, ..., 'kernel')` ->
  'down_blocks.0.attentions.1....weight'."""
  *modules, leaf = (str(p) for p in path)
  name = ".".join(modules)
  for flax_part, torch_part in renames:
    name = f".{name}.".replace(f".{flax_part}.", f".{torch_part}.")[1:-1]
  return f"{name}.{_LEAF_TO_TORCH.get(leaf, leaf)}" if name else _LEAF_TO_TORCH.get(leaf, leaf)


def to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in the layout of the Flax parameter named `leaf`."""
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  """A Flax parameter in PyTorch's layout (inverse of `to_flax_layout`)."""
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  return array


def _shape_of(variable) -> tuple:
  return tuple(variable.get_value().shape)


def _fmt_list(names: list[str]) -> str:
  first = f"'{names[0]}'"
  return first if len(names) == 1 else f"{first} (and {len(names) - 1} more)"


def assign(
  variables: dict[str, "NamedVariable"],
  state_dict: dict[str, np.ndarray],
  *,
  source: str,
  ignore: Iterable[str] = (),
):
  """Sets each variable from the PyTorch tensor of the same name, strictly.

  `variables` maps PyTorch names to the model's variables (whose leaf names say the layout).
  Missing names, unused tensors (other than those named in `ignore`, such as buffers older
  checkpoints stored) and shape mismatches raise a CheckpointError naming the first offending
  key; nothing is assigned unless everything fits.
  """
  missing = sorted(name for name in variables if name not in state_dict)
  if missing:
    name = missing[0]
    raise CheckpointError(
      f"{source}: missing key {_fmt_list(missing)} (expected shape {_torch_shape(variables[name])})"
    )
  unused = sorted(set(state_dict) - set(variables) - set(ignore))
  if unused:
    raise CheckpointError(
      f"{source}: unexpected key {_fmt_list(unused)} "
      f"(shape {list(state_dict[unused[0]].shape)}); it has no place in the model"
    )
  converted = {}
  for name, variable in variables.items():
    array = to_flax_layout(variable.leaf, np.asarray(state_dict[name]))
    if tuple(array.shape) != _shape_of(variable):
      raise CheckpointError(
        f"{source}: key '{name}' has shape {list(state_dict[name].shape)}, "
        f"expected {_torch_shape(variable)}"
      )
    converted[name] = array
  for name, variable in variables.items():
    variable.set_value(jnp.asarray(converted[name], dtype=variable.get_value().dtype))


def _torch_shape(variable) -> list[int]:
  """The PyTorch shape of a variable's tensor (its Flax shape in PyTorch's layout)."""
  shape = _shape_of(variable)
  if variable.leaf == "kernel" and len(shape) == 2:
    return [shape[1], shape[0]]
  if variable.leaf == "kernel" and len(shape) == 4:
    return [shape[3], shape[2], shape[0], shape[1]]
  return list(shape)


def named_variables(
  model: nnx.Module, name_fn: Callable[[tuple], str], variable_filter=nnx.Param
) -> dict[str, "NamedVariable"]:
  """{PyTorch name: variable} over the model's variables matching `variable_filter`."""
  out = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, variable_filter)):
    out[name_fn(path)] = NamedVariable(variable, str(path[-1]))
  return out


class NamedVariable:
  """A Variable together with its Flax leaf name (which decides the tensor layout)."""

  def __init__(self, variable: nnx.Variable, leaf: str):
    self.variable, self.leaf = variable, leaf

  def get_value(self):
    return self.variable.get_value()

  def set_value(self, value):
    self.variable.set_value(value)


def export_named(variables: dict[str, "NamedVariable"], dtype=None) -> dict[str, np.ndarray]:
  """{PyTorch name: numpy array in PyTorch layout}, optionally cast to `dtype`."""
  out = {}
  for name, variable in variables.items():
    array = to_torch_layout(variable.leaf, np.asarray(variable.get_value()))
    out[name] = np.asarray(array if dtype is None else array.astype(dtype), order="C")
  return out
