"""ControlNetModel: float32 parity with diffusers, strict loading, config validation, UNet fit."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ipadapter_jax.models.controlnet import ControlNetConfig, ControlNetModel, check_fits
from ipadapter_jax.models.released import SD15_UNET, SDXL_UNET
from ipadapter_jax.models.unet import UNetConfig
from ipadapter_jax.weights import CheckpointError, load_controlnet, save_controlnet
from tests import torch_reference as ref

_UNET_ONLY = ("up_block_types", "out_channels", "sample_size")


def _controlnet_kwargs(unet_like: dict, **extra) -> dict:
  """diffusers ControlNetModel arguments with the trunk of a tiny UNet config."""
  kw = {k: v for k, v in unet_like.items() if k not in _UNET_ONLY}
  return {**kw, "conditioning_embedding_out_channels": (8, 16), **extra}


# name: (ControlNetModel arguments, seed)
_MODELS = {
  "sd15": (_controlnet_kwargs(ref.SD15_LIKE), 10),
  "sdxl": (_controlnet_kwargs(ref.SDXL_LIKE), 11),
  # bgr input, diffusers' attention-free mid block, a 4x conditioning embedding, one layer
  "variant": (
    _controlnet_kwargs(
      ref.SD15_LIKE,
      controlnet_conditioning_channel_order="bgr",
      mid_block_type="UNetMidBlock2D",
      conditioning_embedding_out_channels=(4, 8, 16),
      layers_per_block=1,
    ),
    12,
  ),
  "pooled": (_controlnet_kwargs(ref.SD15_LIKE, global_pool_conditions=True), 13),
}


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
  """{name: (diffusers ControlNetModel with random weights, its saved folder)}."""
  from diffusers import ControlNetModel as TorchControlNet

  out = {}
  for name, (kwargs, seed) in _MODELS.items():
    torch.manual_seed(seed)
    model = ref.randomize_(TorchControlNet(**kwargs), seed)
    folder = tmp_path_factory.mktemp(f"controlnet_{name}")
    model.save_pretrained(folder)
    out[name] = (model, str(folder))
  return out


@pytest.fixture(scope="module")
def loaded(controlnets):
  """{name: the same ControlNet loaded into JAX}, loaded on first use."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = load_controlnet(controlnets[name][1])
    return cache[name]

  return get


@nnx.jit(static_argnames=("guess_mode", "layout"))
def apply(
  model,
  sample,
  t,
  context,
  cond,
  scale,
  text_embeds=None,
  time_ids=None,
  guess_mode=False,
  layout="NCHW",
):
  return model(
    sample,
    t,
    context,
    cond,
    conditioning_scale=scale,
    text_embeds=text_embeds,
    time_ids=time_ids,
    guess_mode=guess_mode,
    layout=layout,
  )


def _inputs(torch_model, size, batch=2, seq=7, seed=0):
  g = torch.Generator().manual_seed(seed)
  cfg = torch_model.config
  x = torch.randn(batch, cfg.in_channels, *size, generator=g)
  ctx = torch.randn(batch, seq, cfg.cross_attention_dim, generator=g)
  factor = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
  cond = torch.rand(batch, 3, size[0] * factor, size[1] * factor, generator=g)
  t = torch.tensor([999, 17][:batch])
  added = None
  if cfg.addition_embed_type == "text_time":
    added = {
      "text_embeds": torch.randn(batch, ref.SDXL_POOLED_DIM, generator=g),
      "time_ids": torch.tensor([[64.0, 48.0, 3.0, 0.0, 64.0, 48.0]] * batch),
    }
  return x, t, ctx, cond, added


@pytest.mark.parametrize(
  "name,size,scale,guess_mode,layout",
  [
    ("sd15", (16, 16), 1.0, False, "NCHW"),
    ("sd15", (12, 10), 0.6, True, "NHWC"),
    ("sdxl", (16, 16), 0.6, False, "NCHW"),
    ("sdxl", (16, 16), 1.0, True, "NCHW"),
    ("variant", (8, 6), 0.6, False, "NCHW"),
    ("pooled", (8, 8), 0.6, True, "NCHW"),  # guess mode does not apply to pooled conditions
  ],
)
def test_float32_parity_with_diffusers(controlnets, loaded, name, size, scale, guess_mode, layout):
  torch_model, _ = controlnets[name]
  x, t, ctx, cond, added = _inputs(torch_model, size)
  with torch.no_grad():
    down, mid = torch_model(
      x,
      t,
      ctx,
      cond,
      conditioning_scale=scale,
      added_cond_kwargs=added,
      guess_mode=guess_mode,
      return_dict=False,
    )
  expected = [r.numpy() for r in (*down, mid)]
  to_layout = (lambda a: a.transpose(0, 2, 3, 1)) if layout == "NHWC" else (lambda a: a)
  kw = {} if added is None else {k: jnp.asarray(v.numpy()) for k, v in added.items()}
  actual_down, actual_mid = apply(
    loaded(name),
    jnp.asarray(to_layout(x.numpy())),
    jnp.asarray(t.numpy()),
    jnp.asarray(ctx.numpy()),
    jnp.asarray(to_layout(cond.numpy())),
    scale,
    guess_mode=guess_mode,
    layout=layout,
    **kw,
  )
  actual = [np.asarray(r) for r in (*actual_down, actual_mid)]
  if layout == "NHWC":
    actual = [a.transpose(0, 3, 1, 2) for a in actual]
  assert len(actual) == len(expected)
  errors = [ref.assert_close(a, e, rel=1e-5) for a, e in zip(actual, expected)]
  peak = max(float(np.abs(e).max()) for e in expected)
  print(
    f"{name} {size} scale={scale} guess_mode={guess_mode}: {len(actual)} residuals, "
    f"max abs error {max(errors):.2e}, output max {peak:.2f}"
  )


def test_residuals_are_linear_in_the_conditioning_scale(loaded):
  model = loaded("sd15")
  x = jnp.ones((1, 4, 8, 8))
  ctx = jnp.ones((1, 3, 32))
  cond = jnp.full((1, 3, 16, 16), 0.5)
  full_down, full_mid = apply(model, x, 5, ctx, cond, 1.0)
  part_down, part_mid = apply(model, x, 5, ctx, cond, 0.25)
  for a, b in zip((*full_down, full_mid), (*part_down, part_mid)):
    np.testing.assert_allclose(np.asarray(b), 0.25 * np.asarray(a), rtol=1e-6, atol=1e-7)


def test_saved_folder_loads_in_diffusers_unchanged(controlnets, loaded, tmp_path):
  from diffusers import ControlNetModel as TorchControlNet

  torch_model, _ = controlnets["sdxl"]
  save_controlnet(loaded("sdxl"), tmp_path / "saved")
  again = TorchControlNet.from_pretrained(tmp_path / "saved")
  original = torch_model.state_dict()
  reloaded = again.state_dict()
  assert set(reloaded) == set(original)
  for key, value in original.items():
    assert torch.equal(reloaded[key], value), key


def _copy_with(folder, tmp_path, edit):
  from safetensors.torch import load_file, save_file

  state = load_file(f"{folder}/diffusion_pytorch_model.safetensors")
  edit(state)
  out = tmp_path / "edited"
  out.mkdir()
  (out / "config.json").write_text(open(f"{folder}/config.json").read())
  save_file(state, str(out / "diffusion_pytorch_model.safetensors"))
  return str(out)


def test_a_missing_weight_is_named(controlnets, tmp_path):
  folder = _copy_with(
    controlnets["sd15"][1], tmp_path, lambda s: s.pop("controlnet_down_blocks.3.weight")
  )
  with pytest.raises(CheckpointError, match=r"missing key 'controlnet_down_blocks\.3\.weight'"):
    load_controlnet(folder)


def test_an_extra_weight_is_named(controlnets, tmp_path):
  def add(state):
    state["controlnet_down_blocks.99.weight"] = torch.zeros(1)

  folder = _copy_with(controlnets["sd15"][1], tmp_path, add)
  with pytest.raises(CheckpointError, match=r"unexpected key 'controlnet_down_blocks\.99\.weight'"):
    load_controlnet(folder)


def test_a_unet_folder_is_not_a_controlnet(tmp_path):
  (tmp_path / "config.json").write_text(
    json.dumps({"_class_name": "UNet2DConditionModel", **ref.SD15_LIKE})
  )
  with pytest.raises(CheckpointError, match="describes a UNet2DConditionModel"):
    load_controlnet(str(tmp_path))


def test_inputs_are_checked(loaded):
  model = loaded("sdxl")
  with pytest.raises(ValueError, match="text_embeds and time_ids"):
    model(jnp.zeros((1, 8, 8, 4)), 1, jnp.zeros((1, 3, 40)), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="must be 2x the latent size"):
    model(
      jnp.zeros((1, 8, 8, 4)),
      1,
      jnp.zeros((1, 3, 40)),
      jnp.zeros((1, 8, 8, 3)),
      text_embeds=jnp.zeros((1, 24)),
      time_ids=jnp.zeros((1, 6)),
    )


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("class_embed_type", "timestep", "'class_embed_type'='timestep' is not supported"),
    ("resnet_time_scale_shift", "scale_shift", "'resnet_time_scale_shift'"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "'mid_block_type'"),
    ("controlnet_conditioning_channel_order", "rbg", "'controlnet_conditioning_channel_order'"),
    ("addition_embed_type", "text", "'addition_embed_type'='text' is not supported"),
    ("layers_per_block", [2, 1, 2], "'layers_per_block'=\\[2, 1, 2\\] is not supported"),
    ("attention_head_dim", [4, 4], "'num_attention_heads' has 2 entries for 3 down blocks"),
    ("attention_head_dim", 5, "do not split into 5 heads"),
    ("some_future_option", 3, "unknown key 'some_future_option'"),
  ],
)
def test_unsupported_config_names_the_key(key, value, message):
  raw = dict(_controlnet_kwargs(ref.SD15_LIKE), **{key: value})
  with pytest.raises(ValueError, match=message):
    ControlNetConfig.from_diffusers(raw, source="cn/config.json")


def test_config_agrees_with_diffusers_from_unet():
  for unet_like in (ref.SD15_LIKE, ref.SD2_LIKE, ref.SDXL_LIKE):
    parsed = ControlNetConfig.from_diffusers(_controlnet_kwargs(unet_like))
    derived = ControlNetConfig.from_unet(
      UNetConfig.from_diffusers(unet_like), conditioning_embedding_out_channels=(8, 16)
    )
    assert parsed == derived
    assert ControlNetConfig.from_diffusers(parsed.to_diffusers()) == parsed


def _unet(unet_like, **changes):
  return UNetConfig.from_diffusers({**unet_like, **changes})


@pytest.mark.parametrize(
  "controlnet_like,unet,key,mine,theirs",
  [
    (ref.SD15_LIKE, _unet(ref.SD2_LIKE), "layers_per_block", (2, 2, 2), (1, 1, 1)),
    (ref.SD15_LIKE, _unet(ref.SDXL_LIKE), "block_out_channels", (32, 64, 64), (32, 64)),
    (
      ref.SD15_LIKE,
      _unet(ref.SD15_LIKE, cross_attention_dim=48),
      "cross_attention_dim",
      (32, 32, 32),
      (48, 48, 48),
    ),
    (ref.SD15_LIKE, _unet(ref.SD15_LIKE, in_channels=9), "in_channels", 4, 9),
    (
      ref.SDXL_LIKE,
      _unet(ref.SDXL_LIKE, addition_embed_type=None),
      "addition_embed_type",
      "text_time",
      None,
    ),
    (
      ref.SDXL_LIKE,
      _unet(
        ref.SDXL_LIKE, addition_time_embed_dim=4, projection_class_embeddings_input_dim=24 + 6 * 4
      ),
      "addition_time_embed_dim",
      8,
      4,
    ),
  ],
)
def test_check_fits_names_the_mismatch(controlnet_like, unet, key, mine, theirs):
  config = ControlNetConfig.from_diffusers(_controlnet_kwargs(controlnet_like))
  check_fits(config, UNetConfig.from_diffusers(controlnet_like))  # its own UNet fits
  message = f"cn: '{key}' is {mine!r} in the ControlNet but {theirs!r} in the UNet"
  with pytest.raises(ValueError, match=re.escape(message)):
    check_fits(config, unet, "cn")


def test_real_sizes_by_shape():
  counts = []
  for raw in (SD15_UNET, SDXL_UNET):
    config = ControlNetConfig.from_unet(UNetConfig.from_diffusers(raw))
    model = nnx.eval_shape(lambda config=config: ControlNetModel(config, rngs=nnx.Rngs(0)))
    counts.append(sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model))))
    assert len(model.controlnet_down_blocks) == config.num_down_residuals
  assert counts == [361_279_120, 1_251_014_160]  # diffusers' ControlNetModel.from_unet
