"""Reading weight files and strict, table-driven loading of diffusers UNet folders."""

import copy
import json
import os
import shutil

import ml_dtypes
import numpy as np
import jax.numpy as jnp
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from ipadapter_jax.weights import CheckpointError, load_unet
from ipadapter_jax.weights.diffusers import unet_torch_name
from ipadapter_jax.weights.files import read_safetensors
from tests import torch_reference as ref

KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def _params(model):
  return {unet_torch_name(path): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


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
  folder = _edited_folder(tmp_path, unet_folders["sd15"][1],
                          lambda s: s.__setitem__(extra, torch.zeros(3)))
  with pytest.raises(CheckpointError, match=f"unexpected key '{extra}'"):
    load_unet(folder)


def test_wrong_shape_is_named(unet_folders, tmp_path):
  folder = _edited_folder(tmp_path, unet_folders["sd15"][1],
                          lambda s: s.__setitem__(KEY, torch.zeros(32, 31)))
  with pytest.raises(CheckpointError, match=rf"key '{KEY}' has shape \[32, 31\], expected \[32, 32\]"):
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


@pytest.mark.parametrize("save_kwargs", [
    dict(variant="fp16"), dict(max_shard_size="40KB"), dict(safe_serialization=False),
    dict(safe_serialization=False, max_shard_size="40KB")])
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
