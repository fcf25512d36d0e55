"""T2IAdapter: float32 parity with diffusers, strict loading, config and fit checks,
preprocessing."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import T2IAdapter as TorchT2IAdapter
from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_xl_adapter import (
  _preprocess_adapter_image,
)
from PIL import Image
from safetensors.torch import load_file, save_file

from ipadapter_jax.models.released import SD15_UNET, SDXL_UNET
from ipadapter_jax.models.t2i_adapter import (
  T2IAdapterConfig,
  avg_pool_2x2_ceil,
  check_fits,
  pixel_unshuffle,
)
from ipadapter_jax.models.unet import UNetConfig
from ipadapter_jax.preprocessing import preprocess_adapter_image
from ipadapter_jax.weights import CheckpointError, load_t2i_adapter, save_t2i_adapter
from tests import torch_reference as ref

# SDXL's topology in miniature: three down blocks, so that an XL adapter's fourth map goes to the
# mid block as in the real model (SDXL_LIKE has two down blocks and no mid-block map).
SDXL3_LIKE = dict(
  ref.SDXL_LIKE,
  block_out_channels=(32, 64, 64),
  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
  transformer_layers_per_block=(1, 1, 1),
  attention_head_dim=(2, 4, 4),
)

# name: (adapter config, the tiny UNet it is sized for, image size H x W for the parity test)
CASES = {
  "xl": (
    dict(channels=[32, 64], downscale_factor=16, adapter_type="full_adapter_xl"),
    ref.SDXL_LIKE,
    (64, 48),
  ),
  "xl_mid": (
    dict(channels=[32, 64, 64, 64], downscale_factor=16, adapter_type="full_adapter_xl"),
    SDXL3_LIKE,
    (80, 48),
  ),  # 5x3 before pooling
  "full": (
    dict(channels=[32, 64, 64], downscale_factor=8, adapter_type="full_adapter"),
    ref.SD15_LIKE,
    (40, 56),
  ),  # 5x7 -> 3x4 -> 2x2: ceil-mode edge windows
  "light": (
    dict(channels=[32, 64], num_res_blocks=1, downscale_factor=8, adapter_type="light_adapter"),
    ref.SD15_LIKE,
    (40, 64),
  ),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
  """{name: (diffusers T2IAdapter with random weights, its saved folder)}."""
  out = {}
  for seed, (name, (config, _, _)) in enumerate(CASES.items()):
    torch.manual_seed(seed)
    model = ref.randomize_(TorchT2IAdapter(in_channels=3, **config), seed)
    folder = tmp_path_factory.mktemp(f"t2i_{name}")
    model.save_pretrained(folder)
    out[name] = (model, str(folder))
  return out


@pytest.fixture(scope="module")
def unets():
  """The tiny diffusers UNets the cases are sized for, by the id of their config."""
  return {
    id(cfg): ref.tiny_unet(cfg, seed=i)
    for i, cfg in enumerate([ref.SD15_LIKE, ref.SDXL_LIKE, SDXL3_LIKE])
  }


@pytest.mark.parametrize("name", CASES)
def test_float32_parity_with_diffusers(adapters, name):
  torch_model, folder = adapters[name]
  model = load_t2i_adapter(folder)
  x = torch.rand(2, 3, *CASES[name][2], generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = [f.numpy() for f in torch_model(x)]
  nchw = model(jnp.asarray(x.numpy()), layout="NCHW")
  nhwc = model(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  assert len(nchw) == len(nhwc) == len(expected) == len(model.config.levels)
  errs = []
  for a, b, e, level in zip(nchw, nhwc, expected, model.config.levels):
    assert e.shape[1] == level.channels
    assert e.shape[2] == -(-x.shape[2] // level.downscale)
    errs.append(ref.assert_close(a, e, rel=1e-5))
    ref.assert_close(np.asarray(b).transpose(0, 3, 1, 2), e, rel=1e-5)
  assert model.config.total_downscale_factor == torch_model.total_downscale_factor
  print(f"t2i {name}: max abs error per map {', '.join(f'{e:.1e}' for e in errs)}")


def test_save_round_trip_through_diffusers(adapters, tmp_path):
  torch_model, folder = adapters["light"]
  save_t2i_adapter(load_t2i_adapter(folder), str(tmp_path / "out"))
  again = TorchT2IAdapter.from_pretrained(str(tmp_path / "out"))
  for k, v in torch_model.state_dict().items():
    torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)


def test_bfloat16_storage_and_compute(adapters):
  _, folder = adapters["xl"]
  model = load_t2i_adapter(folder, dtype=jnp.bfloat16)
  exact = load_t2i_adapter(folder)
  x = jnp.asarray(np.random.default_rng(0).random((1, 64, 64, 3), np.float32))
  for f, g in zip(model(x), exact(x)):
    assert f.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(f.astype(jnp.float32) - g))) < 0.05 * float(jnp.max(jnp.abs(g)))


@pytest.mark.parametrize("name", CASES)
def test_fits_its_unet_exactly_where_diffusers_adds_the_maps(adapters, unets, name):
  """check_fits accepts each case, and diffusers' UNet then consumes every map (it pops them
  from the list it is given) at 64x64 pixels, 8x8 latents."""
  torch_model, _ = adapters[name]
  config, unet_cfg, _ = CASES[name]
  unet = unets[id(unet_cfg)]
  check_fits(
    T2IAdapterConfig.from_diffusers(dict(torch_model.config)),
    UNetConfig.from_diffusers(dict(unet.config)),
  )
  assert _left_over(unet, torch_model) == 0


def test_refuses_what_diffusers_would_drop(unets):
  """A third XL map at 1/32 of the image has no slot in SDXL_LIKE (its mid block is at 1/16):
  diffusers skips it silently; check_fits names it."""
  torch.manual_seed(0)
  torch_model = TorchT2IAdapter(
    channels=[32, 64, 64], downscale_factor=16, adapter_type="full_adapter_xl"
  )
  unet = unets[id(ref.SDXL_LIKE)]
  assert _left_over(unet, torch_model) == 1
  with pytest.raises(ValueError, match=r"feature map 2 comes at 1/32 .* the mid block .* 1/16"):
    check_fits(
      T2IAdapterConfig.from_diffusers(dict(torch_model.config)),
      UNetConfig.from_diffusers(dict(unet.config)),
    )


def _left_over(unet, torch_adapter) -> int:
  g = torch.Generator().manual_seed(0)
  cfg = unet.config
  with torch.no_grad():
    maps = list(torch_adapter(torch.rand(1, 3, 64, 64, generator=g)))
    added = None
    if cfg.addition_embed_type == "text_time":
      added = {
        "text_embeds": torch.randn(1, ref.SDXL_POOLED_DIM, generator=g),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
      }
    unet(
      torch.randn(1, 4, 8, 8, generator=g),
      torch.tensor([500]),
      torch.randn(1, 5, cfg.cross_attention_dim, generator=g),
      added_cond_kwargs=added,
      down_intrablock_additional_residuals=maps,
    )
  return len(maps)


RELEASED = {  # the config.json of TencentARC's adapters
  "sd15": dict(
    in_channels=3,
    channels=[320, 640, 1280, 1280],
    num_res_blocks=2,
    downscale_factor=8,
    adapter_type="full_adapter",
  ),
  "sdxl": dict(
    in_channels=3,
    channels=[320, 640, 1280, 1280],
    num_res_blocks=2,
    downscale_factor=16,
    adapter_type="full_adapter_xl",
  ),
  "light": dict(
    in_channels=3,
    channels=[320, 640, 1280],
    num_res_blocks=4,
    downscale_factor=8,
    adapter_type="light_adapter",
  ),
}


def test_check_fits_released_models():
  sd15 = UNetConfig.from_diffusers(dict(SD15_UNET))
  sdxl = UNetConfig.from_diffusers(dict(SDXL_UNET))
  released = {k: T2IAdapterConfig.from_diffusers(dict(v)) for k, v in RELEASED.items()}
  check_fits(released["sd15"], sd15)
  check_fits(released["light"], sd15)
  check_fits(released["sdxl"], sdxl)
  with pytest.raises(
    ValueError,
    match=r"^sd15 adapter: feature map 0 comes at 1/8 .* down block 0 "
    r"\(DownBlock2D, after its downsampler\) .* needs 1/16",
  ):
    check_fits(released["sd15"], sdxl, "sd15 adapter")
  with pytest.raises(ValueError, match=r"gives 5 feature maps .* the UNet takes 3 .* or 4 with"):
    check_fits(
      T2IAdapterConfig.from_diffusers(dict(RELEASED["sdxl"], channels=[320] + [640] * 4)), sdxl
    )
  with pytest.raises(
    ValueError,
    match=r"^sdxl adapter: feature map 0 comes at 1/16 of the image "
    r"\('downscale_factor'=16.*needs 1/8",
  ):
    check_fits(released["sdxl"], sd15, "sdxl adapter")
  narrow = T2IAdapterConfig.from_diffusers(dict(RELEASED["sd15"], channels=[320, 640, 1024, 1280]))
  with pytest.raises(
    ValueError,
    match=r"feature map 2 has 'channels'\[2\]=1024, but down block 2 "
    r"\(CrossAttnDownBlock2D.*'block_out_channels'\[2\]=1280",
  ):
    check_fits(narrow, sd15)
  with pytest.raises(
    ValueError, match=r"feature map 0 comes at 1/8 .* needs 1/16 \(vae_scale_factor 16\)"
  ):
    check_fits(released["sd15"], sd15, vae_scale_factor=16)


def test_strict_loading(adapters, tmp_path):
  _, folder = adapters["full"]
  state = load_file(f"{folder}/diffusion_pytorch_model.safetensors")
  config = json.load(open(f"{folder}/config.json"))

  def write(name, tensors):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / name / "diffusion_pytorch_model.safetensors"))
    return str(tmp_path / name)

  missing = write(
    "missing", {k: v for k, v in state.items() if k != "adapter.body.1.in_conv.weight"}
  )
  with pytest.raises(CheckpointError, match=r"missing key 'adapter.body.1.in_conv.weight'"):
    load_t2i_adapter(missing)
  extra = write("extra", {**state, "adapter.body.0.in_conv.weight": torch.zeros(32, 32, 1, 1)})
  with pytest.raises(CheckpointError, match=r"unexpected key 'adapter.body.0.in_conv.weight'"):
    load_t2i_adapter(extra)
  wrong = write("wrong", {**state, "adapter.conv_in.bias": torch.zeros(33)})
  with pytest.raises(CheckpointError, match=r"'adapter.conv_in.bias' has shape \[33\]"):
    load_t2i_adapter(wrong)


@pytest.mark.parametrize(
  "change,message",
  [
    (dict(adapter_type="style_adapter"), r"'adapter_type'='style_adapter' is not supported"),
    (dict(extra_key=1), r"unknown key 'extra_key'"),
    (dict(channels=[]), r"'channels' must be a non-empty list"),
    (dict(channels=[32, 0]), r"'channels'\[1\] must be a positive integer"),
    (dict(downscale_factor=0), r"'downscale_factor' must be a positive integer"),
    (
      dict(adapter_type="full_adapter_xl", channels=[32, 64, 64, 128]),
      r"'channels'\[3\]=128 must equal 'channels'\[2\]=64",
    ),
    (dict(adapter_type="light_adapter", channels=[2, 8]), r"'channels'\[0\]=2 is too small"),
  ],
)
def test_config_refusals(change, message):
  raw = dict(RELEASED["sd15"], _class_name="T2IAdapter", _diffusers_version="0.42.1", **change)
  with pytest.raises(ValueError, match=rf"^my/config.json: {message}"):
    T2IAdapterConfig.from_diffusers(raw, source="my/config.json")


def test_config_requires_the_placing_keys_and_round_trips():
  for key in ("channels", "downscale_factor", "adapter_type"):
    raw = {k: v for k, v in RELEASED["sdxl"].items() if k != key}
    with pytest.raises(ValueError, match=rf"^c: required key '{key}' is missing"):
      T2IAdapterConfig.from_diffusers(raw, "c")
  raw = dict(in_channels=1, num_res_blocks=1, **CASES["xl"][0])
  config = T2IAdapterConfig.from_diffusers(raw)
  torch_config = TorchT2IAdapter.from_config(config.to_diffusers()).config
  assert {k: torch_config[k] for k in raw} == raw
  assert T2IAdapterConfig.from_diffusers(config.to_diffusers()) == config
  defaults = T2IAdapterConfig.from_diffusers(dict(CASES["xl"][0]))
  assert (defaults.in_channels, defaults.num_res_blocks) == (3, 2)  # as diffusers


def test_pixel_unshuffle_and_pool_match_torch():
  x = torch.randn(2, 3, 12, 8, generator=torch.Generator().manual_seed(0))
  expected = torch.nn.PixelUnshuffle(4)(x).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(
    pixel_unshuffle(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), 4), expected
  )
  y = torch.randn(1, 2, 5, 7, generator=torch.Generator().manual_seed(1))
  pooled = torch.nn.AvgPool2d(2, 2, ceil_mode=True)(y).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(
    avg_pool_2x2_ceil(jnp.asarray(y.numpy().transpose(0, 2, 3, 1))), pooled, rtol=1e-6, atol=1e-7
  )


def test_input_checks(adapters):
  model = load_t2i_adapter(adapters["full"][1])
  with pytest.raises(ValueError, match=r"size 36x40 does not divide by .* downscale_factor 8"):
    model(jnp.zeros((1, 36, 40, 3)))
  with pytest.raises(ValueError, match=r"expected a NCHW batch with 3 channels"):
    model(jnp.zeros((1, 1, 40, 40)), layout="NCHW")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_preprocess_matches_diffusers(mode):
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)).convert(mode)
  expected = _preprocess_adapter_image(image, 64, 48).numpy()[0].transpose(1, 2, 0)
  actual = preprocess_adapter_image(image, 64, 48)
  assert actual.shape == (64, 48, 3 if mode == "RGB" else 1) and actual.dtype == np.float32
  np.testing.assert_array_equal(actual, expected)
  np.testing.assert_array_equal(preprocess_adapter_image(np.asarray(image), 64, 48), expected)
  with pytest.raises(ValueError, match=r"image mode 'CMYK' is not supported"):
    preprocess_adapter_image(image.convert("CMYK"), 64, 48)
  with pytest.raises(ValueError, match=r"expected a uint8 array"):
    preprocess_adapter_image(np.zeros((4, 4, 3), np.float32), 64, 48)
