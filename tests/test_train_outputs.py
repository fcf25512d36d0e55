"""ipadapter_jax.train.outputs: the run files, the exports of every stage (read back by this
project's readers and by diffusers / transformers), and the periodic sample grids."""

import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file

from ipadapter_jax.generation.pipeline import IPAdapterPipeline, PipelineOutput
from ipadapter_jax.models import AdapterParam
from ipadapter_jax.train.loading import load_models
from ipadapter_jax.train.outputs import SampleGrids, export, write_run_files
from ipadapter_jax.weights import load_ip_adapter, load_unet, read_ip_adapter
from ipadapter_jax.weights.adapter_checkpoint import abstract_unet_for
from tests import torch_reference as ref
from tests.test_train import tiny_config


def _move_off_init(module, filter_, seed):
  """Overwrites the weights `filter_` selects with seeded noise: an export must carry these,
  not the initialisation or the weights on disk."""
  rng = np.random.default_rng(seed)
  for _, variable in nnx.to_flat_state(nnx.state(module, filter_)):
    value = variable.get_value()
    variable.set_value(
      jnp.asarray(rng.standard_normal(value.shape) * 0.05 + np.asarray(value), value.dtype)
    )


@pytest.fixture(scope="module")
def adapter_sd(tiny_world):
  """The models of an adapter run (trainable="all" builds the same UNet and adapter), with the
  adapter and the UNet's conv_in moved off their initial / loaded values."""
  sd = load_models(tiny_config(tiny_world, "unused", **{"model.trainable": "all"}))
  _move_off_init(sd.unet, AdapterParam, 0)
  kernel = sd.unet.conv_in.kernel
  kernel.set_value(kernel.get_value() * 2.0)
  return sd


def _flat(module, filter_):
  return {
    ".".join(map(str, p)): np.asarray(v.get_value())
    for p, v in nnx.to_flat_state(nnx.state(module, filter_))
  }


# ----- write_run_files -----------------------------------------------------------------------


def test_run_files_hold_the_config_and_what_convert_needs(tiny_world, adapter_sd, tmp_path):
  """Catches a config.json that is not this run's config, and an adapter_config.json from
  which the adapter's UNet cannot be rebuilt (convert to-official reads it)."""
  cfg = tiny_config(tiny_world, "unused", **{"model.trainable": "all", "batch_size": 6})
  write_run_files(cfg, adapter_sd, str(tmp_path))
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["model"]["pretrained"] == str(tiny_world / "sd")
  assert written["batch_size"] == 6 and written["model"]["trainable"] == "all"
  assert written["sample_prompts"] == list(cfg.sample_prompts)
  assert written == json.loads(cfg.to_json())  # every key, nested
  rebuilt = abstract_unet_for(str(tmp_path))
  assert rebuilt.adapter_config == adapter_sd.unet.adapter_config
  assert rebuilt.config == adapter_sd.unet.config
  shapes = lambda m: {k: v.shape for k, v in nnx.to_flat_state(nnx.state(m, AdapterParam))}
  assert shapes(rebuilt) == shapes(adapter_sd.unet)


def test_run_files_of_a_run_without_adapter(tiny_world, tmp_path):
  """Catches an adapter_config.json written for a UNet that has no adapter."""
  cfg = tiny_config(tiny_world, "unused", **{"model.trainable": "unet"})
  sd = load_models(cfg)
  assert sd.unet.adapter_config is None
  write_run_files(cfg, sd, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json"]  # no adapter_config.json


# ----- export --------------------------------------------------------------------------------


def test_adapter_export_is_the_current_adapter_in_float32(tiny_world, adapter_sd, tmp_path):
  """Catches an export of other weights than `sd`'s, float16 rounding (the writer's default),
  a pipeline folder written for an adapter-only run, and keys diffusers would not place."""
  cfg = tiny_config(tiny_world, "unused")  # trainable="adapter"
  written = export(cfg, adapter_sd, str(tmp_path))
  path = str(tmp_path / "ip_adapter.safetensors")
  assert written == [path] and sorted(os.listdir(tmp_path)) == ["ip_adapter.safetensors"]
  state = read_ip_adapter(path)
  assert {v.dtype for v in state.values()} == {np.dtype(np.float32)}
  fresh = load_unet(str(tiny_world / "sd" / "unet"), adapter=adapter_sd.unet.adapter_config)
  load_ip_adapter(fresh, path)  # this project's reader, into a UNet built from scratch
  expected, got = _flat(adapter_sd.unet, AdapterParam), _flat(fresh, AdapterParam)
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  # diffusers' own loader puts each to_k_ip / to_v_ip in the layer it belongs to
  from diffusers import UNet2DConditionModel

  torch_unet = UNet2DConditionModel.from_pretrained(str(tiny_world / "sd" / "unet"))
  nested = {"image_proj": {}, "ip_adapter": {}}
  for key, value in load_file(path).items():
    section, name = key.split(".", 1)
    nested[section][name] = torch.from_numpy(value)
  torch_unet._load_ip_adapter_weights([nested])  # pylint: disable=protected-access
  procs = [p for p in torch_unet.attn_processors.values() if hasattr(p, "to_k_ip")]
  layers = adapter_sd.unet.decoupled_layers()
  assert len(procs) == len(layers)
  for proc, layer in zip(procs, layers):
    np.testing.assert_array_equal(
      proc.to_k_ip[0].weight.detach().numpy(), np.asarray(layer.to_k_ip.kernel.get_value()).T
    )
    np.testing.assert_array_equal(
      proc.to_v_ip[0].weight.detach().numpy(), np.asarray(layer.to_v_ip.kernel.get_value()).T
    )


def test_export_adapter_off_writes_nothing_for_an_adapter_run(tiny_world, adapter_sd, tmp_path):
  cfg = tiny_config(tiny_world, "unused", export_adapter=False)
  assert export(cfg, adapter_sd, str(tmp_path)) == []
  assert os.listdir(tmp_path) == []


def test_all_export_is_the_adapter_and_a_pipeline_diffusers_loads(tiny_world, adapter_sd, tmp_path):
  """Catches a missing pipeline folder for a run that trained the UNet, a pipeline holding the
  loaded weights instead of the trained ones, and a folder diffusers cannot load."""
  from diffusers import StableDiffusionPipeline

  cfg = tiny_config(tiny_world, "unused", **{"model.trainable": "all"})
  written = export(cfg, adapter_sd, str(tmp_path))
  assert written == [str(tmp_path / "ip_adapter.safetensors"), str(tmp_path / "pipeline")]
  theirs = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipeline"), safety_checker=None)
  original = StableDiffusionPipeline.from_pretrained(str(tiny_world / "sd"), safety_checker=None)
  trained = theirs.unet.state_dict()
  assert not any("_ip" in k for k in trained)  # the base UNet: the adapter is its own file
  for key, value in original.unet.state_dict().items():
    expected = 2.0 * value if key == "conv_in.weight" else value  # conv_in was doubled
    np.testing.assert_array_equal(trained[key].numpy(), expected.numpy(), err_msg=key)
  for part in ("vae", "text_encoder"):
    got = getattr(theirs, part).state_dict()
    for key, value in getattr(original, part).state_dict().items():
      np.testing.assert_array_equal(got[key].numpy(), value.numpy(), err_msg=f"{part}.{key}")
  assert theirs.tokenizer("a red circle").input_ids == original.tokenizer("a red circle").input_ids


def test_clip_stage_export_is_a_transformers_clip_model(tmp_path):
  """Catches a logit_scale other than log(1 / temperature), a folder without the tokenizer or
  the image settings, and towers that are not the run's."""
  from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

  from ipadapter_jax.tokenizer import write_word_tokenizer

  folder = tmp_path / "clip_in"
  model = ref.randomize_(
    CLIPModel(
      CLIPConfig(text_config=dict(ref.TEXT_LIKE), vision_config=ref.VISION_LIKE, projection_dim=24)
    ),
    5,
  )
  model.save_pretrained(folder)
  CLIPImageProcessor(size=30, crop_size=30).save_pretrained(folder)
  write_word_tokenizer(str(folder), ref.WORDS, model_max_length=16)
  cfg = tiny_config(
    tmp_path,
    "unused",
    **{"model.trainable": "clip", "model.pretrained": str(folder), "contrastive_temperature": 0.05},
  )
  sd = load_models(cfg)
  _move_off_init(sd.text_encoder, nnx.Param, 1)
  workdir = tmp_path / "run"
  assert export(cfg, sd, str(workdir)) == [str(workdir / "clip")]
  theirs = CLIPModel.from_pretrained(str(workdir / "clip")).eval()
  assert abs(float(theirs.logit_scale) - float(np.log(1 / 0.05))) <= 1e-6
  ids = torch.tensor([[0, 5, 7, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
  pixels = torch.from_numpy(
    np.random.default_rng(0).standard_normal((1, 3, 30, 30), dtype=np.float32)
  )
  with torch.no_grad():
    text = theirs.get_text_features(input_ids=ids)
    image = theirs.get_image_features(pixel_values=pixels)
  text, image = (getattr(x, "pooler_output", x).numpy() for x in (text, image))
  ref.assert_close(text, sd.text_encoder(jnp.asarray(ids.numpy())).text_embeds)
  ref.assert_close(
    image, sd.image_encoder(jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))).image_embeds
  )
  assert CLIPImageProcessor.from_pretrained(str(workdir / "clip")).crop_size["height"] == 30
  assert (
    CLIPTokenizer.from_pretrained(str(workdir / "clip"))("a red circle").input_ids
    == CLIPTokenizer.from_pretrained(str(folder))("a red circle").input_ids
  )


def test_vae_stage_export_is_a_diffusers_autoencoder(tiny_world, tmp_path):
  """Catches a VAE stage exported as something else, or with its loaded weights."""
  from diffusers import AutoencoderKL

  cfg = tiny_config(
    tiny_world,
    "unused",
    **{
      "model.trainable": "vae",
      "model.image_encoder": "",
      "model.pretrained": str(tiny_world / "sd" / "vae"),
    },
  )
  sd = load_models(cfg)
  assert sd.unet is None
  sd.vae.decoder.conv_out.kernel.set_value(sd.vae.decoder.conv_out.kernel.get_value() * 3.0)
  assert export(cfg, sd, str(tmp_path)) == [str(tmp_path / "vae")]
  got = AutoencoderKL.from_pretrained(str(tmp_path / "vae")).state_dict()
  for key, value in (
    AutoencoderKL.from_pretrained(str(tiny_world / "sd" / "vae")).state_dict().items()
  ):
    expected = 3.0 * value if key == "decoder.conv_out.weight" else value
    np.testing.assert_array_equal(got[key].numpy(), expected.numpy(), err_msg=key)


# ----- SampleGrids -----------------------------------------------------------------------------

TILE_H, TILE_W = 8, 6  # not square: a transposed grid shows


class _StubPipe:
  """Records what it is asked; each image is one colour: (prompt index, prompt image's red)."""

  def __init__(self, prompts, image_prompt):
    self.prompts = list(prompts)
    self.models = SimpleNamespace(
      unet=SimpleNamespace(image_proj=object() if image_prompt else None)
    )
    self.calls = []

  def update_weights(self, weights):
    self.calls.append(("update_weights", weights))

  def __call__(self, prompts, images, *, output_type="pil", **request):
    assert output_type == "np"  # the grid is made from the float array
    self.calls.append(("call", list(prompts), images, request))
    out = np.zeros((len(prompts), TILE_H, TILE_W, 3), np.float32)
    for k, prompt in enumerate(prompts):
      red = 0 if images is None else int(np.asarray(images[k])[0, 0, 0])
      out[k] = np.array([40 * (1 + self.prompts.index(prompt)), red, 200]) / 255.0
    return PipelineOutput(out)


class _Metrics:
  def __init__(self):
    self.images = []

  def write_image(self, step, name, image):
    self.images.append((step, name, np.asarray(image)))


def _prompt_images(tmp_path, reds):
  paths = []
  for red in reds:
    path = str(tmp_path / f"prompt_{red}.png")
    Image.fromarray(np.full((12, 10, 3), (red, 9, 9), np.uint8)).save(path)
    paths.append(path)
  return tuple(paths)


@pytest.mark.parametrize(
  "reds,image_prompt", [((), False), ((70,), True), ((70, 130), True), ((70, 130, 190), True)]
)
def test_sample_grid_rows_are_images_and_columns_prompts(tiny_world, tmp_path, reds, image_prompt):
  """Catches images and prompts paired in the wrong order (row-major vs column-major), the
  weights applied after sampling, another request than the config's, a file name without the
  zero-padded step, and a TensorBoard image that is not the PNG."""
  prompts = ("", "best quality")
  cfg = tiny_config(
    tiny_world,
    "unused",
    sample_prompts=prompts,
    sample_steps=3,
    seed=11,
    sample_images=_prompt_images(tmp_path, reds),
  )
  pipe, metrics = _StubPipe(prompts, image_prompt), _Metrics()
  grids = SampleGrids(cfg, pipe, str(tmp_path / "run"), metrics)
  weights = {"marker": 1}
  grids(1234, weights)
  assert pipe.calls[0] == ("update_weights", weights)
  ((_, called_prompts, called_images, request),) = pipe.calls[1:]
  assert request == dict(num_inference_steps=3, seed=11, height=32, width=32)
  assert (called_images is None) == (not reds)
  png = Image.open(tmp_path / "run" / "samples" / "step_0001234.png")
  grid = np.asarray(png.convert("RGB"))
  rows = max(1, len(reds))
  assert grid.shape == (rows * TILE_H, len(prompts) * TILE_W, 3)
  for r in range(rows):
    for c in range(len(prompts)):
      tile = grid[r * TILE_H : (r + 1) * TILE_H, c * TILE_W : (c + 1) * TILE_W]
      expected = (40 * (1 + c), reds[r] if reds else 0, 200)
      assert (tile == np.array(expected, np.uint8)).all(), (r, c, tile[0, 0])
  assert len(metrics.images) == 1
  step, name, image = metrics.images[0]
  assert (step, name) == (1234, "samples")
  np.testing.assert_array_equal(image, grid)


def test_sample_grids_without_an_adapter_ignore_the_images(tiny_world, tmp_path):
  """A base-model run (no image projection) samples the prompts alone, one row."""
  prompts = ("a red circle", "a blue square")
  cfg = tiny_config(
    tiny_world, "unused", sample_prompts=prompts, sample_images=_prompt_images(tmp_path, (50,))
  )
  pipe = _StubPipe(prompts, image_prompt=False)
  SampleGrids(cfg, pipe, str(tmp_path), _Metrics())(7, {})
  ((_, called_prompts, called_images, _),) = pipe.calls[1:]
  assert called_prompts == list(prompts) and called_images is None


def test_sample_grid_with_the_real_pipeline_uses_the_given_weights(tiny_world, tmp_path):
  """With the tiny SD and IP-Adapter: the grid is the pipeline's images for the (image, prompt)
  pairs with the weights passed in (a grid from the weights already loaded would differ)."""
  prompts = ("", "a red circle")
  cfg = tiny_config(
    tiny_world,
    "unused",
    sample_prompts=prompts,
    sample_steps=2,
    sample_images=(str(tiny_world / "prompt.png"),),
  )
  sd = load_models(cfg)
  pipe = IPAdapterPipeline(sd)
  before = _flat(sd.unet, AdapterParam)
  weights = jax.tree.map(
    lambda x: np.asarray(x) * 4.0 + 0.1, nnx.state(sd.networks(), AdapterParam)
  )
  grids = SampleGrids(cfg, pipe, str(tmp_path), _Metrics())
  grids(3, weights)
  got = np.asarray(Image.open(tmp_path / "samples" / "step_0000003.png").convert("RGB"))
  # the same requests, made by hand with the same weights
  request = dict(num_inference_steps=2, seed=cfg.seed, height=32, width=32, output_type="np")
  prompt_image = Image.open(tiny_world / "prompt.png")
  images = pipe(list(prompts), [prompt_image] * 2, **request).images
  assert images.shape == (2, 32, 32, 3)
  # one row (the prompt image), one column per prompt; the same program on the same inputs
  expected = np.concatenate([np.round(images[0] * 255), np.round(images[1] * 255)], axis=1)
  np.testing.assert_array_equal(got, expected.astype(np.uint8))
  # sd's own weights were left alone, and they would make another grid
  after = _flat(sd.unet, AdapterParam)
  assert all(np.array_equal(before[k], after[k]) for k in before)
  pipe.update_weights(nnx.state(sd.networks(), AdapterParam))
  original = pipe(list(prompts), [prompt_image] * 2, **request).images
  assert np.abs(original - images).max() > 1e-2
