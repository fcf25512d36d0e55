"""Reading PyTorch-world weight files into flat {name: numpy array} mappings.

safetensors files are read with the `safetensors` library, one tensor per lookup (numpy arrays,
bfloat16 through ml_dtypes, no torch needed); its errors become one-line CheckpointErrors that
name the file. `.bin` pickles are read with `torch.load(weights_only=True)`, only when torch
2.10 or newer is installed (older versions have published bypasses of weights_only), and one that
holds anything but tensors is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from ipadapter_jax.storage import atomic_path


class CheckpointError(ValueError):
  """A weight file that cannot be read, or that does not fit the model it is loaded into."""


class SafetensorsFile(Mapping):
  """The tensors of a .safetensors file by name; each lookup reads that one tensor from disk."""

  def __init__(self, path: str):
    self.path = path
    try:
      # pread, not mmap: a lookup copies its tensor either way, and a file replaced or truncated
      # while this is open then fails with an error rather than a SIGBUS on a mapped page.
      self._file = safetensors.safe_open(path, framework="numpy", backend="pread")
    except safetensors.SafetensorError as e:
      raise CheckpointError(f"{path}: {_open_problem(path, e)}") from None
    except OSError as e:
      raise CheckpointError(f"{path}: cannot be opened ({e.strerror or e})") from None
    self._names = tuple(self._file.keys())
    self._known = frozenset(self._names)
    self.metadata = self._file.metadata() or {}

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._known:
      raise KeyError(name)
    try:
      return self._file.get_tensor(name)
    except safetensors.SafetensorError as e:
      raise CheckpointError(
        f"{self.path}: tensor '{name}' cannot be read ({_one_line(str(e))})"
      ) from None
    except (AttributeError, TypeError, ValueError):  # a dtype numpy lacks (e.g. F8_E4M3)
      raise CheckpointError(
        f"{self.path}: tensor '{name}' has unsupported dtype "
        f"{self._file.get_slice(name).get_dtype()}"
      ) from None

  def __contains__(self, name) -> bool:  # Mapping's default would read the tensor
    return name in self._known

  def __iter__(self) -> Iterator[str]:
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)

  def __repr__(self) -> str:
    return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


def _one_line(text: str) -> str:
  return " ".join(text.split())


def _open_problem(path: str, error: Exception) -> str:
  """The library's reason a file does not open, in this project's words."""
  reason = _one_line(str(error)).removeprefix("Error while deserializing header: ")
  size = os.path.getsize(path)
  if reason.startswith("header too small"):
    return f"not a safetensors file (only {size} bytes)"
  if reason.startswith(("header too large", "invalid header length")):
    return (
      f"truncated or not a safetensors file (its header length does not fit a file of {size} bytes)"
    )
  if reason.startswith("incomplete metadata"):
    return _uncovered(path, size)
  unknown = re.search(r"unknown variant `([^`]*)`", reason)
  if unknown:  # the library lists every dtype it knows after this; the name is enough
    return f"unsupported dtype {unknown.group(1)} in the header"
  if reason.startswith("invalid"):  # JSON, UTF-8, or a tensor's shape, dtype or offsets
    return f"corrupt safetensors header ({reason})"
  return f"cannot be read as safetensors ({reason})"


def _uncovered(path: str, size: int) -> str:
  """Which tensor runs past the end, when the library found that the tensors do not cover the
  data exactly (it does not say which); its header has already parsed."""
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
  header.pop("__metadata__", None)
  ends = sorted((8 + header_len + info["data_offsets"][1], name) for name, info in header.items())
  past = [(end, name) for end, name in ends if end > size]
  if past:
    return f"truncated file: tensor '{past[0][1]}' ends at byte {past[0][0]} of {size}"
  last = ends[-1][0] if ends else 8 + header_len
  return f"corrupt file: its tensors end at byte {last}, but it has {size} bytes"


def read_safetensors(path: str) -> SafetensorsFile:
  """The tensors of a .safetensors file as a mapping that reads each one when it is looked up."""
  return SafetensorsFile(path)


def torch_to_numpy(tensor) -> np.ndarray:
  """A torch tensor as numpy (bfloat16 through ml_dtypes)."""
  import torch  # pylint: disable=import-outside-toplevel

  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


# How torch's weights-only unpickler names a reference it refused (a class or function to call).
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _pickle_problem(error: Exception) -> str:
  """Why torch.load(weights_only=True) refused a file, without torch's advice to lift the guard."""
  text = str(error)
  refused = _REFUSED_GLOBAL.search(text)
  if refused:
    return (
      f"holds objects other than tensors ({refused.group(1)}), which unpickling could "
      "run as code; it was not loaded"
    )
  # torch wraps the unpickler's own reason (e.g. an unknown opcode) in that advice
  _, marker, after = text.partition("WeightsUnpickler error:")
  reason = _one_line((after if marker else text).strip().split("\n\n")[0])
  if not reason or "weights_only" in reason:
    reason = type(error).__name__
  return f"cannot be read as a torch checkpoint (corrupt or not a torch file: {reason})"


# weights_only can be bypassed to run code below 2.6 (CVE-2025-32434) and below 2.10
# (CVE-2026-24747).
SAFE_TORCH_LOAD = (2, 10)


def _torch_release(version: str) -> tuple[int, int] | None:
  """(major, minor) of a torch version string such as "2.9.1+cu121"; None when unparseable."""
  match = re.match(r"(\d+)\.(\d+)", version)
  return (int(match.group(1)), int(match.group(2))) if match else None


def read_torch_pickle(path: str) -> dict:
  """A torch .bin checkpoint (nested dicts kept), loaded with weights_only=True."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError(
      f"{path}: reading .bin files needs torch; install it or use a .safetensors file"
    ) from None
  release = _torch_release(str(torch.__version__))
  if release is None or release < SAFE_TORCH_LOAD:
    raise CheckpointError(
      f"{path}: not read: torch {torch.__version__} cannot load .bin files safely (its "
      "weights_only guard has published bypasses before 2.10); use the .safetensors version of "
      "this checkpoint, or upgrade torch to 2.10 or newer"
    )
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(f"{path}: {_pickle_problem(e)}") from None
  except Exception as e:  # torch raises many types for corrupt files
    reason = _one_line(str(e).split(". ")[0])
    if not reason or "weights_only" in reason:
      reason = type(e).__name__
    raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({reason})") from None

  def convert(value):
    if isinstance(value, dict):
      return {k: convert(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
      return torch_to_numpy(value)
    raise CheckpointError(f"{path}: unexpected {type(value).__name__} in the checkpoint")

  return convert(obj)


def read_weight_file(path: str) -> Mapping:
  """A .safetensors file (read lazily, tensor by tensor) or a .bin file, as numpy arrays by name."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
    return read_torch_pickle(path)
  raise CheckpointError(f"{path}: unknown weight file type (expected .safetensors or .bin)")


class _Shards(Mapping):
  """The shards of one checkpoint as one mapping; a lookup reads only from the shard holding it."""

  def __init__(self, shards: list[Mapping]):
    self._owner = {name: shard for shard in shards for name in shard}

  def __getitem__(self, name: str) -> np.ndarray:
    return self._owner[name][name]

  def __contains__(self, name) -> bool:
    return name in self._owner

  def __iter__(self) -> Iterator[str]:
    return iter(self._owner)

  def __len__(self) -> int:
    return len(self._owner)


def weight_file_names(stem: str, variant: str | None, *, torch_pickles: bool = True) -> list[str]:
  """The files `read_model_folder` looks for, in order: `{stem}.safetensors` and its shard index,
  then (with `torch_pickles`) `{stem}.bin` and its index. A variant goes before the extension
  (`.fp16.safetensors`, `.safetensors.index.fp16.json`; the older `.safetensors.fp16.index.json`
  is read as well)."""
  names = []
  for ext in ("safetensors", "bin") if torch_pickles else ("safetensors",):
    if variant:
      names += [
        f"{stem}.{variant}.{ext}",
        f"{stem}.{ext}.index.{variant}.json",
        f"{stem}.{ext}.{variant}.index.json",
      ]
    else:
      names += [f"{stem}.{ext}", f"{stem}.{ext}.index.json"]
  return names


def read_model_folder(
  folder: str, weights_name: str, variant: str | None = None
) -> tuple[Mapping, str]:
  """The state dict of a diffusers/transformers model folder, and the file it came from: the
  first of `weight_file_names` that is there (an index reads the shards it lists)."""
  candidates = weight_file_names(weights_name, variant)
  for name in candidates:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    if not path.endswith(".json"):
      return read_weight_file(path), path
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    state = _Shards(
      [read_weight_file(os.path.join(folder, shard)) for shard in sorted(set(weight_map.values()))]
    )
    missing = sorted(set(weight_map) - set(state))
    if missing:
      raise CheckpointError(f"{path}: key '{missing[0]}' listed in the index is in no shard")
    return state, path
  raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(candidates)})")


def write_safetensors(
  path: str, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None
):
  """Writes numpy arrays (bfloat16 included) as a .safetensors file, atomically."""
  # The library writes each array's buffer as it lies in memory, so make every one C-ordered
  # (asarray rather than ascontiguousarray, which would turn a scalar into a 1-d array).
  arrays = {name: np.asarray(array, order="C") for name, array in tensors.items()}
  with atomic_path(path) as tmp:
    try:
      safetensors.numpy.save_file(arrays, tmp, metadata={"format": "pt", **(metadata or {})})
    except safetensors.SafetensorError as e:
      raise CheckpointError(f"{path}: {_write_problem(arrays, e)}") from None


def _write_problem(arrays: dict[str, np.ndarray], error: Exception) -> str:
  """The library's refusal to write, naming the first tensor of the dtype it names."""
  reason = _one_line(str(error))
  bad = next((name for name, array in arrays.items() if f'"{array.dtype.name}"' in reason), None)
  if bad is None:
    return f"cannot be written as safetensors ({reason.split('. ')[0]})"
  return f"tensor '{bad}' has dtype {arrays[bad].dtype}, which safetensors cannot store"


def numpy_to_torch(array: np.ndarray):
  """A numpy array (bfloat16 through ml_dtypes) as a torch tensor."""
  import torch  # pylint: disable=import-outside-toplevel

  array = np.ascontiguousarray(array)
  if array.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def write_torch_pickle(path: str, nested: dict):
  """Writes a (nested) dict of numpy arrays with torch.save, atomically."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError(
      f"{path}: writing .bin files needs torch; write .safetensors instead"
    ) from None

  def convert(value):
    return (
      {k: convert(v) for k, v in value.items()}
      if isinstance(value, dict)
      else numpy_to_torch(value)
    )

  with atomic_path(path) as tmp:
    torch.save(convert(nested), tmp)
