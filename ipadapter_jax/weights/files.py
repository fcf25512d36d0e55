"""Reading PyTorch-world weight files into flat {name: numpy array} dicts.

safetensors is parsed here directly (a JSON header and raw little-endian buffers), so bfloat16
works without torch and a truncated or corrupt file is reported by name. `.bin` pickles are read
with `torch.load(weights_only=True)`, only when torch is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
  """A weight file that cannot be read, or that does not fit the model it is loaded into."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file, memory-mapped (read-only numpy arrays)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", prefix)
    if 8 + header_len > size:
      raise CheckpointError(f"{path}: truncated or not a safetensors file "
                            f"(header of {header_len} bytes, file of {size})")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len) if header else None
  tensors = {}
  for name, info in header.items():
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
    dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
    start, end = info["data_offsets"]
    if 8 + header_len + end > size:
      raise CheckpointError(f"{path}: truncated file: tensor '{name}' ends at byte "
                            f"{8 + header_len + end} of {size}")
    if (end - start) != dtype.itemsize * int(np.prod(info["shape"])):
      raise CheckpointError(f"{path}: tensor '{name}' has {end - start} bytes for shape "
                            f"{info['shape']} {info['dtype']}")
    tensors[name] = data[start:end].view(dtype).reshape(info["shape"])
  return tensors


def torch_to_numpy(tensor) -> np.ndarray:
  """A torch tensor as numpy (bfloat16 through ml_dtypes)."""
  import torch  # pylint: disable=import-outside-toplevel
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def read_torch_pickle(path: str) -> dict:
  """A torch .bin checkpoint (nested dicts kept), loaded with weights_only=True."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError(f"{path}: reading .bin files needs torch; install it or use a "
                          ".safetensors file") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt pickles
    raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({e})") from None

  def convert(value):
    if isinstance(value, dict):
      return {k: convert(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
      return torch_to_numpy(value)
    raise CheckpointError(f"{path}: unexpected {type(value).__name__} in the checkpoint")
  return convert(obj)


def read_weight_file(path: str) -> dict:
  """A .safetensors or .bin file as a dict of numpy arrays."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
    return read_torch_pickle(path)
  raise CheckpointError(f"{path}: unknown weight file type (expected .safetensors or .bin)")


def _with_variant(filename: str, variant: str | None) -> str:
  if not variant:
    return filename
  stem, ext = filename.rsplit(".", 1)
  return f"{stem}.{variant}.{ext}"


def read_model_folder(folder: str, weights_name: str,
                      variant: str | None = None) -> tuple[dict, str]:
  """The state dict of a diffusers/transformers model folder, and the file it came from.

  Looks for `{weights_name}.safetensors`, its sharded index, then `{weights_name}.bin` and its
  index, each with the variant inserted before the extension (`.fp16.safetensors`).
  """
  candidates = [f"{weights_name}.safetensors", f"{weights_name}.safetensors.index.json",
                f"{weights_name}.bin", f"{weights_name}.bin.index.json"]
  for name in candidates:
    path = os.path.join(folder, _with_variant(name, variant))
    if not os.path.isfile(path):
      continue
    if not path.endswith(".json"):
      return read_weight_file(path), path
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    state = {}
    for shard in sorted(set(weight_map.values())):
      state.update(read_weight_file(os.path.join(folder, shard)))
    missing = sorted(set(weight_map) - set(state))
    if missing:
      raise CheckpointError(f"{path}: key '{missing[0]}' listed in the index is in no shard")
    return state, path
  tried = ", ".join(_with_variant(c, variant) for c in candidates)
  raise CheckpointError(f"{folder}: no weights found (looked for {tried})")


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path beside `path` (a file or a folder); it replaces `path` only when the
  block succeeds, so a failed conversion never leaves a half-written or clobbered result."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=".partial-", dir=parent)
  tmp = os.path.join(tmp_dir, os.path.basename(path))
  try:
    yield tmp
    if os.path.isdir(path):  # os.replace cannot overwrite a folder: move the old one aside
      old = os.path.join(tmp_dir, ".previous")
      os.replace(path, old)
      try:
        os.replace(tmp, path)
      except OSError:
        os.replace(old, path)
        raise
    else:
      os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
  """Writes numpy arrays (bfloat16 included) as a .safetensors file, atomically."""
  header, offset, arrays = {}, 0, []
  for name, array in tensors.items():
    array = np.asarray(array, order="C")  # (ascontiguousarray would make a scalar 1-d)
    if array.dtype not in _DTYPE_NAMES:
      raise CheckpointError(f"{path}: tensor '{name}' has dtype {array.dtype}, which "
                            "safetensors cannot store")
    header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  header["__metadata__"] = {"format": "pt", **(metadata or {})}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for array in arrays:
        f.write(array.tobytes())


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
    raise CheckpointError(f"{path}: writing .bin files needs torch; write .safetensors "
                          "instead") from None

  def convert(value):
    return ({k: convert(v) for k, v in value.items()} if isinstance(value, dict)
            else numpy_to_torch(value))
  with atomic_path(path) as tmp:
    torch.save(convert(nested), tmp)
