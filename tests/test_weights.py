"""Reading weight files and strict, table-driven loading of diffusers UNet folders."""

import copy
import json
import os
import pickle
import re
import shutil
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from ipadapter_jax.weights import CheckpointError, load_unet
from ipadapter_jax.weights.diffusers import unet_torch_name
from ipadapter_jax.weights.files import (
  read_model_folder,
  read_safetensors,
  read_weight_file,
  write_safetensors,
)
from tests import torch_reference as ref

KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def _params(model):
  return {
    unet_torch_name(path): np.asarray(v.get_value())
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def _edited_folder(tmp_path, source, edit):
  folder = tmp_path / "unet"
  shutil.copytree(source, folder)
  path = folder / "diffusion_pytorch_model.safetensors"
  state = {k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(str(path)).items()}
  edit(state)
  save_file(state, str(path))
  return str(folder)


def test_missing_key_is_named(unet_folders, tmp_path):
  folder = _edited_folder(tmp_path, unet_folders["sd15"][1], lambda s: s.pop(KEY))
  with pytest.raises(CheckpointError, match=f"missing key '{KEY}'.*expected shape"):
    load_unet(folder)


def test_unexpected_key_is_named(unet_folders, tmp_path):
  extra = "down_blocks.0.attentions.0.something_new.weight"
  folder = _edited_folder(
    tmp_path, unet_folders["sd15"][1], lambda s: s.__setitem__(extra, torch.zeros(3))
  )
  with pytest.raises(CheckpointError, match=f"unexpected key '{extra}'"):
    load_unet(folder)


def test_wrong_shape_is_named(unet_folders, tmp_path):
  folder = _edited_folder(
    tmp_path, unet_folders["sd15"][1], lambda s: s.__setitem__(KEY, torch.zeros(32, 31))
  )
  with pytest.raises(
    CheckpointError, match=rf"key '{KEY}' has shape \[32, 31\], expected \[32, 32\]"
  ):
    load_unet(folder)


def test_truncated_file_is_reported(unet_folders, tmp_path):
  folder = tmp_path / "unet"
  shutil.copytree(unet_folders["sd15"][1], folder)
  path = folder / "diffusion_pytorch_model.safetensors"
  os.truncate(path, os.path.getsize(path) - 100)
  with pytest.raises(CheckpointError, match="truncated file"):
    load_unet(str(folder))


def test_missing_weights_are_reported(unet_folders, tmp_path):
  folder = tmp_path / "unet"
  folder.mkdir()
  shutil.copy(os.path.join(unet_folders["sd15"][1], "config.json"), folder)
  with pytest.raises(CheckpointError, match="no weights found"):
    load_unet(str(folder))


@pytest.mark.parametrize(
  "save_kwargs",
  [
    dict(variant="fp16"),
    dict(max_shard_size="40KB"),
    dict(safe_serialization=False),
    dict(safe_serialization=False, max_shard_size="40KB"),
  ],
)
def test_variants_shards_and_bin_files(unet_folders, tmp_path, save_kwargs):
  torch_unet = unet_folders["sd15"][0]
  source = copy.deepcopy(torch_unet).half() if "variant" in save_kwargs else torch_unet
  source.save_pretrained(tmp_path, **save_kwargs)
  files = os.listdir(tmp_path)
  if "max_shard_size" in save_kwargs:
    assert any(f.endswith(".index.json") for f in files), files
  model = load_unet(str(tmp_path), variant=save_kwargs.get("variant"))
  expected = _params(load_unet(unet_folders["sd15"][1]))
  for name, value in _params(model).items():
    # fp16 rounds each weight by up to 2**-11 (4.9e-4) of its size; the other layouts are exact.
    tol = 1e-3 * max(1.0, np.abs(expected[name]).max()) if "variant" in save_kwargs else 0
    np.testing.assert_allclose(value, expected[name], atol=tol, err_msg=name)


def test_whole_pipeline_folder_and_dtype(unet_folders, tmp_path):
  pipeline = tmp_path / "pipeline"
  shutil.copytree(unet_folders["sd15"][1], pipeline / "unet")
  (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
  model = load_unet(str(pipeline), param_dtype=jnp.bfloat16)
  dtypes = {v.dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  out = ref.jit_call(model, jnp.ones((1, 8, 8, 4)), 5, jnp.ones((1, 3, 32)))
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


def test_bfloat16_safetensors_read_without_torch_conversion(tmp_path):
  value = torch.randn(5, 3, dtype=torch.bfloat16)
  save_file({"w": value, "i": torch.arange(4)}, str(tmp_path / "x.safetensors"))
  loaded = read_safetensors(str(tmp_path / "x.safetensors"))
  assert loaded["w"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(loaded["w"].astype(np.float32), value.float().numpy())
  np.testing.assert_array_equal(loaded["i"], np.arange(4))


def test_safetensors_round_trip_with_metadata(tmp_path):
  path = str(tmp_path / "x.safetensors")
  write_safetensors(
    path,
    {"a": np.arange(6, dtype=np.float32).reshape(2, 3).T, "s": np.asarray(2.0, np.float32)},
    {"note": "kept"},
  )
  loaded = read_safetensors(path)
  assert set(loaded) == {"a", "s"} and len(loaded) == 2 and "a" in loaded and "b" not in loaded
  assert loaded.metadata == {"format": "pt", "note": "kept"}
  # "a" was written from a non-contiguous view
  np.testing.assert_array_equal(loaded["a"], np.arange(6).reshape(2, 3).T)
  assert loaded["s"].shape == ()
  with pytest.raises(KeyError):
    loaded["b"]  # pylint: disable=pointless-statement


def test_bfloat16_written_without_torch_reads_in_torch(tmp_path):
  value = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
  write_safetensors(str(tmp_path / "x.safetensors"), {"w": value})
  loaded = load_file(str(tmp_path / "x.safetensors"))["w"]
  assert loaded.dtype == torch.bfloat16
  np.testing.assert_array_equal(loaded.float().numpy(), value.astype(np.float32))


def test_sharded_folder_reads_every_shard(tmp_path):
  write_safetensors(str(tmp_path / "model-1.safetensors"), {"a": np.ones(2, np.float32)})
  write_safetensors(str(tmp_path / "model-2.safetensors"), {"b": np.zeros(3, np.float16)})
  (tmp_path / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}})
  )
  state, source = read_model_folder(str(tmp_path), "model")
  assert source.endswith("model.safetensors.index.json") and set(state) == {"a", "b"}
  assert state["b"].dtype == np.float16 and state["b"].shape == (3,)
  (tmp_path / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {"a": "model-1.safetensors", "c": "model-2.safetensors"}})
  )
  with pytest.raises(CheckpointError, match="key 'c' listed in the index is in no shard"):
    read_model_folder(str(tmp_path), "model")


def _bad_safetensors(tmp_path, name, header: bytes, data: bytes = b"") -> str:
  path = tmp_path / name
  path.write_bytes(struct.pack("<Q", len(header)) + header + data)
  return str(path)


def _assert_one_line(error, path):
  message = str(error.value)
  assert message.startswith(f"{path}: ") and "\n" not in message, message


def test_corrupt_or_foreign_safetensors_are_named(tmp_path):
  (tmp_path / "tiny.safetensors").write_bytes(b"abc")
  # a PNG signature read as a header length is far beyond the file
  (tmp_path / "png.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500))
  cases = [
    (
      _bad_safetensors(tmp_path, "json.safetensors", b'{"w": {"dtype": "F32", "sha'),
      r"corrupt safetensors header \(invalid JSON",
    ),
    (
      _bad_safetensors(
        tmp_path,
        "sizes.safetensors",
        json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode(),
        bytes(8),
      ),
      r"corrupt safetensors header \(invalid shape",
    ),
    (
      _bad_safetensors(
        tmp_path,
        "dtype.safetensors",
        json.dumps({"w": {"dtype": "Q3", "shape": [1], "data_offsets": [0, 1]}}).encode(),
        bytes(1),
      ),
      "unsupported dtype Q3",
    ),
    (str(tmp_path / "tiny.safetensors"), r"not a safetensors file \(only 3 bytes\)"),
    (str(tmp_path / "png.safetensors"), "not a safetensors file"),
  ]
  for path, message in cases:
    with pytest.raises(CheckpointError, match=message) as error:
      read_weight_file(path)
    _assert_one_line(error, path)


def test_unsupported_dtypes_are_named(tmp_path):
  path = str(tmp_path / "f8.safetensors")
  write_safetensors(
    path, {"ok": np.ones(2, np.float32), "f8": np.zeros(4, ml_dtypes.float8_e4m3fn)}
  )
  loaded = read_safetensors(path)
  np.testing.assert_array_equal(loaded["ok"], [1, 1])  # the others stay readable
  with pytest.raises(CheckpointError, match=r"tensor 'f8' has unsupported dtype F8_E4M3"):
    loaded["f8"]  # pylint: disable=pointless-statement
  out = tmp_path / "strings.safetensors"
  with pytest.raises(
    CheckpointError,
    match=r"tensor 'names' has dtype <U1, which safetensors "
    "cannot store",
  ):
    write_safetensors(str(out), {"ok": np.ones(2), "names": np.array(["a", "b"])})
  assert not out.exists() and os.listdir(tmp_path) == ["f8.safetensors"]


class _WritesMarker:
  """Unpickling this would create the marker file: what a hostile checkpoint could do."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return open, (self.marker, "w")


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_pickle_with_code_is_refused(tmp_path, form):
  marker = tmp_path / "marker"
  path = tmp_path / "ip-adapter.bin"
  payload = {"image_proj": {"w": torch.ones(2)}, "ip_adapter": _WritesMarker(str(marker))}
  if form == "torch.save":
    torch.save(payload, path)
  else:  # the legacy format: a bare pickle
    with open(path, "wb") as f:
      pickle.dump({"ip_adapter": _WritesMarker(str(marker))}, f, protocol=2)
  with pytest.raises(CheckpointError, match="holds objects other than tensors") as error:
    read_weight_file(str(path))
  _assert_one_line(error, str(path))
  assert "weights_only" not in str(error.value) and "not loaded" in str(error.value)
  assert not marker.exists()


def test_corrupt_bin_is_reported_in_one_line(tmp_path):
  path = tmp_path / "model.bin"
  path.write_bytes(np.random.default_rng(0).bytes(2000))
  with pytest.raises(CheckpointError, match="cannot be read as a torch checkpoint") as error:
    read_weight_file(str(path))
  _assert_one_line(error, str(path))
  assert "weights_only" not in str(error.value)


@pytest.mark.parametrize("version", ["2.9.1+cu121", "2.5.0"])
def test_bin_is_refused_below_torch_2_10(tmp_path, monkeypatch, version):
  """Bug: torch.load(weights_only=True) trusted on versions whose guard has published bypasses."""
  marker = tmp_path / "marker"
  path = tmp_path / "ip-adapter.bin"
  torch.save({"image_proj": {"w": torch.ones(2)}, "ip_adapter": _WritesMarker(str(marker))}, path)
  monkeypatch.setattr(torch, "__version__", version)
  with pytest.raises(
    CheckpointError, match=rf"torch {re.escape(version)} .*\.safetensors"
  ) as error:
    read_weight_file(str(path))
  _assert_one_line(error, str(path))
  assert not marker.exists()


def test_bin_is_read_from_torch_2_10(tmp_path, monkeypatch):
  """Bug: the version check refusing the first safe release (2.10 compared as a string)."""
  path = tmp_path / "ip-adapter.bin"
  torch.save({"image_proj": {"w": torch.ones(2)}}, path)
  monkeypatch.setattr(torch, "__version__", "2.10.0")
  np.testing.assert_array_equal(read_weight_file(str(path))["image_proj"]["w"], np.ones(2))
