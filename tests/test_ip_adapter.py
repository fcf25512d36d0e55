"""Decoupled cross-attention and the image projection against diffusers' own IP-Adapter loader."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ipadapter_jax.models import AdapterConfig, AdapterParam, ImageProjection
from ipadapter_jax.weights import load_ip_adapter, load_unet
from tests import torch_reference as ref

EMBED_DIM = 24
NUM_TOKENS = 4  # diffusers' loader assumes 4 tokens for the basic adapter


@nnx.jit
def apply(model, sample, t, context, image_embeds, ip_scale, text_embeds=None, time_ids=None):
  return model(
    sample,
    t,
    context,
    image_embeds=image_embeds,
    ip_scale=ip_scale,
    text_embeds=text_embeds,
    time_ids=time_ids,
    layout="NCHW",
  )


@nnx.jit
def apply_base(model, sample, t, context, text_embeds=None, time_ids=None):
  return model(sample, t, context, text_embeds=text_embeds, time_ids=time_ids, layout="NCHW")


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pair(request, unet_folders):
  """(diffusers UNet with the adapter, the same in JAX, the base JAX UNet, inputs)."""
  base_torch, folder = unet_folders[request.param]
  torch_unet = copy.deepcopy(base_torch)
  official = ref.official_adapter(torch_unet, NUM_TOKENS, EMBED_DIM, seed=7)
  torch_unet._load_ip_adapter_weights([official])  # diffusers' own IP-Adapter loader
  jax_unet = load_unet(folder, adapter=AdapterConfig(NUM_TOKENS, EMBED_DIM))
  load_ip_adapter(jax_unet, ref.to_numpy(official))
  g = torch.Generator().manual_seed(3)
  cfg = torch_unet.config
  inputs = dict(
    sample=torch.randn(2, 4, 16, 16, generator=g),
    t=torch.tensor([981, 40]),
    context=torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
    image_embeds=torch.randn(2, EMBED_DIM, generator=g),
  )
  added = {}
  if cfg.addition_embed_type == "text_time":
    added = {
      "text_embeds": torch.randn(2, ref.SDXL_POOLED_DIM, generator=g),
      "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2),
    }
  return torch_unet, jax_unet, load_unet(folder), inputs, added


def _torch(pair, scales):
  torch_unet, _, _, inputs, added = pair
  ref.set_ip_scale(torch_unet, scales)
  with torch.no_grad():
    return torch_unet(
      inputs["sample"],
      inputs["t"],
      inputs["context"],
      added_cond_kwargs={**added, "image_embeds": [inputs["image_embeds"][:, None]]},
    ).sample.numpy()


def _jnp(tree):
  return {k: jnp.asarray(v.numpy()) for k, v in tree.items()}


def _jax(pair, scale):
  _, jax_unet, _, inputs, added = pair
  return np.asarray(
    apply(jax_unet, **_jnp(inputs), ip_scale=jnp.asarray(scale, jnp.float32), **_jnp(added))
  )


def _jax_base(pair):
  _, _, base, inputs, added = pair
  kw = {k: v for k, v in _jnp(inputs).items() if k != "image_embeds"}
  return np.asarray(apply_base(base, **kw, **_jnp(added)))


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_parity_with_diffusers_ip_adapter(pair, scale):
  err = ref.assert_close(_jax(pair, scale), _torch(pair, scale))
  print(f"scale {scale}: max abs error {err:.2e}")


def test_per_layer_scale_vector(pair):
  n = len(pair[1].decoupled_layers())
  scales = np.linspace(0.0, 1.5, n).astype(np.float32)
  ref.assert_close(_jax(pair, scales), _torch(pair, scales))
  with pytest.raises(ValueError, match=f"{n} entries"):
    _jax(pair, np.ones(n + 1, np.float32))


def test_image_prompt_changes_the_output(pair):
  assert np.abs(_jax(pair, 1.0) - _jax_base(pair)).max() > 1e-2


def test_scale_zero_and_no_image_equal_base_exactly(pair):
  base = _jax_base(pair)
  np.testing.assert_array_equal(_jax(pair, 0.0), base)
  _, jax_unet, _, inputs, added = pair
  kw = {k: v for k, v in _jnp(inputs).items() if k != "image_embeds"}
  np.testing.assert_array_equal(np.asarray(apply_base(jax_unet, **kw, **_jnp(added))), base)


def test_changing_scale_or_image_does_not_recompile(unet_folders):
  model = load_unet(unet_folders["sd15"][1], adapter=AdapterConfig(NUM_TOKENS, EMBED_DIM))
  graphdef, state = nnx.split(model)
  run = jax.jit(
    lambda state, x, c, e, s: nnx.merge(graphdef, state)(x, 10, c, image_embeds=e, ip_scale=s)
  )
  x, c = jnp.ones((1, 8, 8, 4)), jnp.ones((1, 5, 32))
  outs = [
    run(state, x, c, jnp.full((1, EMBED_DIM), shift), jnp.float32(scale))
    for scale, shift in [(1.0, 0.0), (0.5, 1.0), (0.0, 2.0)]
  ]
  assert run._cache_size() == 1
  assert not np.array_equal(np.asarray(outs[0]), np.asarray(outs[1]))


def test_image_projection_parity_any_shape():
  from diffusers.models.embeddings import ImageProjection as TorchImageProjection

  E, C, N = 40, 24, 6
  torch_proj = ref.randomize_(
    TorchImageProjection(image_embed_dim=E, cross_attention_dim=C, num_image_text_embeds=N), seed=5
  )
  proj = ImageProjection(E, C, N, rngs=nnx.Rngs(0))
  sd = ref.to_numpy(torch_proj.state_dict())
  proj.proj.kernel.set_value(jnp.asarray(sd["image_embeds.weight"].T))
  proj.proj.bias.set_value(jnp.asarray(sd["image_embeds.bias"]))
  proj.norm.scale.set_value(jnp.asarray(sd["norm.weight"]))
  proj.norm.bias.set_value(jnp.asarray(sd["norm.bias"]))
  x = torch.randn(3, E)
  with torch.no_grad():
    expected = torch_proj(x).numpy()
  actual = np.asarray(proj(jnp.asarray(x.numpy())))
  assert actual.shape == (3, N, C)
  ref.assert_close(actual, expected)


def test_zero_embedding_tokens_are_the_normalised_bias():
  proj = ImageProjection(8, 6, 2, rngs=nnx.Rngs(1))
  proj.proj.bias.set_value(jax.random.normal(jax.random.key(2), (12,)))
  tokens = np.asarray(proj(jnp.zeros((1, 8))))
  bias = np.asarray(proj.proj.bias[...]).reshape(2, 6)
  normed = (bias - bias.mean(-1, keepdims=True)) / np.sqrt(bias.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(tokens[0], normed, atol=1e-5)


def test_adapter_is_its_own_variable_type(unet_folders):
  model = load_unet(unet_folders["sd15"][1], adapter=AdapterConfig(4, EMBED_DIM))
  adapter = nnx.state(model, AdapterParam)
  names = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(adapter)}
  assert names and all(
    n.startswith("image_proj.") or ".to_k_ip." in n or ".to_v_ip." in n for n in names
  )
  layers = model.decoupled_layers()
  assert len(names) == 4 + 2 * len(layers)
  assert all(v.dtype == jnp.float32 for _, v in nnx.to_flat_state(adapter))


def test_training_init_copies_base_keys_and_values(unet_folders):
  model = load_unet(unet_folders["sd15"][1], adapter=AdapterConfig(4, EMBED_DIM))
  for layer in model.decoupled_layers():
    np.testing.assert_array_equal(
      np.asarray(layer.to_k_ip.kernel[...]), np.asarray(layer.to_k.kernel[...])
    )
    np.testing.assert_array_equal(
      np.asarray(layer.to_v_ip.kernel[...]), np.asarray(layer.to_v.kernel[...])
    )


def test_simple_adapter_is_one_softmax_over_text_and_image_tokens():
  from ipadapter_jax.models.attention import Attention, ImagePrompt

  layer = Attention(
    16,
    2,
    8,
    context_dim=12,
    image_context_dim=10,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs=nnx.Rngs(0),
  )
  layer.ip_index, layer.joint_softmax = 0, True
  rng = np.random.default_rng(0)
  x, ctx, tokens = (
    jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 5, 16), (2, 7, 12), (2, 3, 10))
  )
  # Text values 0, image values 1 and an identity to_out: the output is the share of the one
  # softmax's mass that lands on the image tokens, per query and head.
  layer.to_v.kernel.set_value(jnp.zeros_like(layer.to_v.kernel[...]))
  layer.to_out.kernel.set_value(jnp.eye(16))
  k_img, _ = layer.image_kv(tokens)
  image_kv = (k_img, jnp.ones_like(k_img))
  share = lambda s: np.asarray(layer(x, ctx, ImagePrompt((image_kv,), jnp.asarray([s]))))

  heads = lambda a: np.asarray(a, np.float64).reshape(a.shape[:-1] + (2, 8))
  k = np.concatenate([heads(layer.to_k(ctx)), np.asarray(k_img, np.float64)], axis=1)
  logits = np.einsum("bthk,bshk->bhts", heads(layer.to_q(x)), k) / np.sqrt(8)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  image_share = weights[..., 7:].sum(-1) / weights.sum(-1)  # [B, H, T]
  share_1 = np.repeat(image_share.transpose(0, 2, 1), 8, axis=-1)  # [B, T, H * K]
  ref.assert_close(share(1.0), share_1)
  # The scale multiplies the image tokens' unnormalised weights; 0 removes them.
  for s in (0.25, 0.7, 3.0):
    ref.assert_close(share(s), s * share_1 / (1 - share_1 + s * share_1))
  np.testing.assert_array_equal(share(0.0), 0.0)


def test_simple_adapter_at_scale_zero_is_the_base_unet_exactly(unet_folders):
  model = load_unet(
    unet_folders["sd15"][1], adapter=AdapterConfig(NUM_TOKENS, EMBED_DIM, attention="simple")
  )
  rng = np.random.default_rng(1)
  x, ctx, embeds = (
    jnp.asarray(rng.standard_normal(s), jnp.float32)
    for s in ((2, 4, 16, 16), (2, 77, 32), (2, EMBED_DIM))
  )
  t = jnp.asarray([981, 40])
  base = np.asarray(apply_base(model, x, t, ctx))
  np.testing.assert_array_equal(np.asarray(apply(model, x, t, ctx, embeds, jnp.float32(0.0))), base)
  assert np.abs(np.asarray(apply(model, x, t, ctx, embeds, jnp.float32(1.0))) - base).max() > 1e-3


def test_image_prompt_is_encoded_once_for_every_timestep(unet_folders):
  model = load_unet(unet_folders["sd15"][1], adapter=AdapterConfig(NUM_TOKENS, EMBED_DIM))
  rng = np.random.default_rng(2)
  x, ctx, embeds = (
    jnp.asarray(rng.standard_normal(s), jnp.float32)
    for s in ((1, 4, 8, 8), (1, 5, 32), (1, EMBED_DIM))
  )
  scale = jnp.float32(0.8)
  prompt = model.encode_image_prompt(embeds, scale)  # no timestep: built before the loop
  run = nnx.jit(lambda model, t, prompt: model(x, t, ctx, image_prompt=prompt, layout="NCHW"))
  outs = {t: np.asarray(run(model, t, prompt)) for t in (981, 40)}
  for t, out in outs.items():
    ref.assert_close(out, np.asarray(apply(model, x, t, ctx, embeds, scale)))
  # Given a prompt, the UNet never touches the adapter's weights: NaN in them changes nothing.
  poison = lambda module: nnx.update(
    module, jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), nnx.state(module))
  )
  poison(model.image_proj)
  for layer in model.decoupled_layers():
    poison(layer.to_k_ip)
    poison(layer.to_v_ip)
  np.testing.assert_array_equal(np.asarray(run(model, 981, prompt)), outs[981])


def test_simple_adapter_has_the_decoupled_budget_and_no_official_file(unet_folders, tmp_path):
  from ipadapter_jax.weights import save_ip_adapter

  folder = unet_folders["sd15"][1]
  count = lambda m: sum(v.size for v in jax.tree.leaves(nnx.state(m, AdapterParam)))
  decoupled = load_unet(folder, adapter=AdapterConfig(num_tokens=4, embed_dim=EMBED_DIM))
  simple = load_unet(
    folder, adapter=AdapterConfig(num_tokens=4, embed_dim=EMBED_DIM, attention="simple")
  )
  assert count(simple) == count(decoupled)
  assert all(layer.joint_softmax for layer in simple.decoupled_layers())
  with pytest.raises(ValueError, match="decoupled adapters only"):
    save_ip_adapter(simple, str(tmp_path / "simple.safetensors"))
  with pytest.raises(ValueError, match="attention must be one of"):
    AdapterConfig(attention="joint")
