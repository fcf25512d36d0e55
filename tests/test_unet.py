"""UNet2DConditionModel: float32 parity with diffusers, real sizes by shape, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ipadapter_jax.models import AdapterConfig, AdapterParam, UNet2DConditionModel, UNetConfig
from ipadapter_jax.models.released import SD15_UNET, SD21_UNET, SDXL_UNET
from ipadapter_jax.weights import load_unet
from tests import torch_reference as ref


@nnx.jit(static_argnames="layout")
def apply(model, sample, t, context, text_embeds=None, time_ids=None, layout="NCHW"):
  return model(sample, t, context, text_embeds=text_embeds, time_ids=time_ids, layout=layout)


def _inputs(torch_unet, batch=2, size=(16, 16), seq=7, seed=0):
  g = torch.Generator().manual_seed(seed)
  cfg = torch_unet.config
  x = torch.randn(batch, cfg.in_channels, *size, generator=g)
  ctx = torch.randn(batch, seq, cfg.cross_attention_dim, generator=g)
  t = torch.tensor([999, 17][:batch])
  added = None
  if cfg.addition_embed_type == "text_time":
    added = {
      "text_embeds": torch.randn(batch, ref.SDXL_POOLED_DIM, generator=g),
      "time_ids": torch.tensor([[64.0, 48.0, 3.0, 0.0, 64.0, 48.0]] * batch),
    }
  return x, t, ctx, added


def _jax_call(model, x, t, ctx, added):
  kw = {} if added is None else {k: jnp.asarray(v.numpy()) for k, v in added.items()}
  return np.asarray(
    apply(model, jnp.asarray(x.numpy()), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()), **kw)
  )


@pytest.mark.parametrize("family,size", [("sd15", (16, 16)), ("sd2", (12, 10)), ("sdxl", (16, 16))])
def test_float32_parity_with_diffusers(unet_folders, family, size):
  torch_unet, folder = unet_folders[family]
  x, t, ctx, added = _inputs(torch_unet, size=size)
  with torch.no_grad():
    expected = torch_unet(x, t, ctx, added_cond_kwargs=added).sample.numpy()
  actual = _jax_call(load_unet(folder), x, t, ctx, added)
  err = ref.assert_close(actual, expected)
  print(f"{family} {size}: max abs error {err:.2e}, output max {np.abs(expected).max():.2f}")


def test_nhwc_and_nchw_layouts_agree(unet_folders):
  model = load_unet(unet_folders["sd15"][1])
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  ctx = jax.random.normal(jax.random.key(1), (1, 5, 32))
  nhwc = apply(model, x, 3, ctx, layout="NHWC")
  nchw = apply(model, x.transpose(0, 3, 1, 2), 3, ctx, layout="NCHW")
  np.testing.assert_array_equal(np.asarray(nhwc), np.asarray(nchw).transpose(0, 2, 3, 1))


def test_sdxl_conditioning_is_required(unet_folders):
  model = load_unet(unet_folders["sdxl"][1])
  with pytest.raises(ValueError, match="text_embeds and time_ids"):
    model(jnp.zeros((1, 8, 8, 4)), 1, jnp.zeros((1, 3, 40)))


def _param_counts(raw_config, adapter=None):
  model = nnx.eval_shape(
    lambda: UNet2DConditionModel(
      UNetConfig.from_diffusers(raw_config), adapter=adapter, rngs=nnx.Rngs(0)
    )
  )
  count = lambda f: sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, f)))
  return model, count(nnx.All(nnx.Param, nnx.Not(AdapterParam))), count(AdapterParam)


def test_real_sizes_by_shape():
  _, sd15, _ = _param_counts(SD15_UNET)
  _, sd21, _ = _param_counts(SD21_UNET)
  _, sdxl, _ = _param_counts(SDXL_UNET)
  assert (sd15, sd21, sdxl) == (859_520_964, 865_910_724, 2_567_463_684)


def test_real_adapter_sizes_by_shape():
  model, base, adapter = _param_counts(SD15_UNET, AdapterConfig(num_tokens=4, embed_dim=1024))
  assert base == 859_520_964 and adapter == 22_319_616
  widths = [layer.to_k_ip.kernel.shape[1] for layer in model.decoupled_layers()]
  assert widths == [
    320,
    320,
    640,
    640,
    1280,
    1280,
    1280,
    1280,
    1280,
    640,
    640,
    640,
    320,
    320,
    320,
    1280,
  ]  # down, up, then mid: the checkpoint's order
  model, base, adapter = _param_counts(SDXL_UNET, AdapterConfig(num_tokens=4, embed_dim=1280))
  assert base == 2_567_463_684 and adapter == 351_285_248
  assert len(model.decoupled_layers()) == 70


def test_param_counts_match_diffusers_for_tiny_configs(unet_folders):
  for family, (torch_unet, _) in unet_folders.items():
    raw = dict(torch_unet.config)
    _, count, _ = _param_counts(raw)
    assert count == sum(p.numel() for p in torch_unet.parameters()), family


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("class_embed_type", "timestep", "'class_embed_type'='timestep' is not supported"),
    ("resnet_time_scale_shift", "scale_shift", "'resnet_time_scale_shift'"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "'mid_block_type'"),
    ("some_future_option", 3, "unknown key 'some_future_option'"),
    ("attention_head_dim", [8, 8], "'num_attention_heads' has 2 entries for 4 down blocks"),
    ("attention_head_dim", 7, "do not split into 7 heads"),
    ("down_block_types", ["AttnDownBlock2D"] * 4, "'AttnDownBlock2D' is not supported"),
  ],
)
def test_unsupported_config_names_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    UNetConfig.from_diffusers(dict(SD15_UNET, **{key: value}))


def test_config_round_trips_through_diffusers_format():
  for raw in (SD15_UNET, SD21_UNET, SDXL_UNET):
    config = UNetConfig.from_diffusers(raw)
    assert UNetConfig.from_diffusers(config.to_diffusers()) == config


def test_num_attention_heads_is_the_head_count():
  legacy = UNetConfig.from_diffusers(dict(SD15_UNET, attention_head_dim=5))
  explicit = UNetConfig.from_diffusers(
    dict(SD15_UNET, attention_head_dim=64, num_attention_heads=5)
  )
  assert legacy == explicit and legacy.num_attention_heads == (5, 5, 5, 5)


def test_remat_policies_give_the_same_gradients(unet_folders):
  model = load_unet(unet_folders["sd15"][1])
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  ctx = jax.random.normal(jax.random.key(1), (2, 5, 32))
  graphdef, params = nnx.split(model, nnx.Param)

  def grads(remat):
    def loss(p):
      unet = nnx.merge(graphdef, p)
      unet.remat = remat
      return jnp.mean(jnp.square(unet(x, 10, ctx)))

    return jax.jit(jax.grad(loss))(params)

  reference = jax.tree.leaves(grads("none"))
  for policy in ("full", "dots"):
    for a, b in zip(jax.tree.leaves(grads(policy)), reference):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_remat_in_an_adapter_step_with_frozen_weights_from_outside(unet_folders):
  from ipadapter_jax.models import AdapterConfig, AdapterParam

  model = load_unet(unet_folders["sd15"][1], adapter=AdapterConfig(num_tokens=4, embed_dim=24))
  graphdef, adapter, frozen = nnx.split(model, AdapterParam, ...)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  ctx = jax.random.normal(jax.random.key(1), (2, 5, 32))
  embeds = jax.random.normal(jax.random.key(2), (2, 24))

  def grads(remat):
    def loss(adapter, frozen):
      unet = nnx.merge(graphdef, adapter, frozen)
      unet.remat = remat
      return jnp.mean(jnp.square(unet(x, 10, ctx, image_embeds=embeds)))

    # The frozen weights are traced by jit but not by grad, as in the train step.
    return jax.jit(lambda a, f: jax.grad(loss)(a, f))(adapter, frozen)

  reference = jax.tree.leaves(grads("none"))
  for policy in ("full", "dots"):
    for a, b in zip(jax.tree.leaves(grads(policy)), reference):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_adapter_gradient_computes_no_frozen_weight_gradients(unet_folders):
  """XLA's FLOP count of the adapter's gradient is about 2x the forward (forward + activation
  backward), against about 3x when the base weights are differentiated too."""
  from ipadapter_jax.models import AdapterConfig, AdapterParam

  model = load_unet(unet_folders["sd15"][1], adapter=AdapterConfig(num_tokens=4, embed_dim=24))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
  ctx = jax.random.normal(jax.random.key(1), (2, 5, 32))
  embeds = jax.random.normal(jax.random.key(2), (2, 24))

  def flops(trainable):
    graphdef, params, rest = nnx.split(model, trainable, ...)
    loss = lambda p, r: jnp.mean(
      jnp.square(nnx.merge(graphdef, p, r)(x, 10, ctx, image_embeds=embeds))
    )
    compiled = jax.jit(lambda p, r: jax.grad(loss)(p, r)).lower(params, rest).compile()
    return compiled.cost_analysis()["flops"]

  graphdef, state = nnx.split(model)
  forward = (
    jax.jit(lambda s: nnx.merge(graphdef, s)(x, 10, ctx, image_embeds=embeds))
    .lower(state)
    .compile()
    .cost_analysis()["flops"]
  )
  adapter, everything = flops(AdapterParam) / forward, flops(nnx.Param) / forward
  print(
    f"gradient FLOPs / forward FLOPs: adapter only {adapter:.2f}, every weight {everything:.2f}"
  )
  assert adapter < 2.3 < 2.7 < everything


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_structure_residuals_are_added_where_diffusers_adds_them(unet_folders, family):
  """T2I-Adapter maps (inside cross-attention down blocks, after the others and into their
  last skip, the leftover into the mid block) and ControlNet residuals (every skip, the mid)."""
  torch_unet, folder = unet_folders[family]
  x, t, ctx, added = _inputs(torch_unet, batch=1)
  g = torch.Generator().manual_seed(5)
  skips = []  # every skip connection, to size the ControlNet residuals
  hooks = [
    block.register_forward_hook(lambda m, i, o: skips.extend(o[1]))
    for block in torch_unet.down_blocks
  ]
  with torch.no_grad():
    torch_unet(x, t, ctx, added_cond_kwargs=added)
  for hook in hooks:
    hook.remove()
  channels = torch_unet.config.block_out_channels
  maps, size = [], x.shape[-1]
  for i, block in enumerate(torch_unet.down_blocks):
    downsampled = size // 2 if block.downsamplers is not None else size
    maps.append(
      torch.randn(
        1, channels[i], *(2 * [size if hasattr(block, "attentions") else downsampled]), generator=g
      )
    )
    size = downsampled
  maps.append(torch.randn(1, channels[-1], size, size, generator=g))  # the mid block's
  control = [torch.randn(*s.shape, generator=g) for s in [torch_unet.conv_in(x)] + skips]
  mid = torch.randn(*maps[-1].shape, generator=g)
  with torch.no_grad():
    expected = torch_unet(
      x,
      t,
      ctx,
      added_cond_kwargs=added,
      down_intrablock_additional_residuals=[m.clone() for m in maps],
      down_block_additional_residuals=control,
      mid_block_additional_residual=mid,
    ).sample.numpy()
  nhwc = lambda a: jnp.asarray(a.detach().numpy().transpose(0, 2, 3, 1))
  kw = {} if added is None else {k: jnp.asarray(v.numpy()) for k, v in added.items()}
  actual = load_unet(folder)(
    jnp.asarray(x.numpy()),
    jnp.asarray(t.numpy()),
    jnp.asarray(ctx.numpy()),
    layout="NCHW",
    intrablock_residuals=[nhwc(m) for m in maps],
    down_residuals=[nhwc(c) for c in control],
    mid_residual=nhwc(mid),
    **kw,
  )
  ref.assert_close(np.asarray(actual), expected)
