"""The adapter's image projections against their formulas written out in float64 numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ipadapter_jax.models import AdapterConfig, FullFaceProjection, ImageProjection, Resampler
from ipadapter_jax.models.image_proj import PerceiverAttention
from tests import torch_reference as ref

_erf = np.vectorize(math.erf)


def _np(a):
  return np.asarray(a, np.float64)


def _layer_norm(x, norm, eps=1e-5):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * _np(norm.scale[...]) + _np(norm.bias[...])


def _linear(linear, x):
  y = x @ _np(linear.kernel[...])
  return y if linear.bias is None else y + _np(linear.bias[...])


def _gelu(x, exact=True):
  if exact:
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _attention(q_BTHK, k_BSHK, v_BSHK):
  logits = np.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK) / np.sqrt(q_BTHK.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhts,bshk->bthk", weights, v_BSHK)


def _randomize(module, seed):
  """Seeded noise in every weight (norm scales near 1), so that no weight can hide."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(module))

  def noise(path, leaf):
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    return jnp.asarray(1.0 + 0.2 * z if "scale" in jax.tree_util.keystr(path) else 0.3 * z)

  nnx.update(module, jax.tree_util.tree_unflatten(treedef, [noise(p, leaf) for p, leaf in leaves]))
  return module


def _randn(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("magnitude", [1.0, 3e-3])
def test_image_projection_is_row_major_tokens_then_layer_norm(magnitude):
  E, D, N = 12, 6, 3
  proj = _randomize(ImageProjection(E, D, N, rngs=nnx.Rngs(0)), seed=1)
  # A small magnitude makes the tokens' variance comparable to eps, so 1e-5 is checked too.
  proj.proj.kernel.set_value(proj.proj.kernel[...] * magnitude)
  proj.proj.bias.set_value(proj.proj.bias[...] * magnitude)
  x = _randn(2, 2, E)
  y = _linear(proj.proj, _np(x))
  tokens = np.stack([y[:, i * D : (i + 1) * D] for i in range(N)], axis=1)
  actual = nnx.jit(lambda m, x: m(x))(proj, x)
  assert actual.shape == (2, N, D)
  ref.assert_close(actual, _layer_norm(tokens, proj.norm), rel=1e-5)
  if magnitude < 1:
    assert np.abs(_np(actual) - _layer_norm(tokens, proj.norm, eps=1e-6)).max() > 1e-2


def test_perceiver_attention_keys_are_the_first_half_of_to_kv():
  dim, heads, head_dim = 16, 2, 8
  attn = _randomize(
    PerceiverAttention(dim, heads, head_dim, dtype=jnp.float32, rngs=nnx.Rngs(0)), seed=3
  )
  x_BTD = _randn(4, 2, 7, dim)
  latents_BND = _randn(5, 2, 4, dim)
  split = lambda y: y.reshape(y.shape[:-1] + (heads, head_dim))

  def expected(keys_first: bool):
    x_n, latents_n = _layer_norm(_np(x_BTD), attn.norm1), _layer_norm(_np(latents_BND), attn.norm2)
    kv = _linear(attn.to_kv, np.concatenate([x_n, latents_n], axis=1))
    first, second = np.split(kv, 2, axis=-1)
    k, v = (first, second) if keys_first else (second, first)
    out = _attention(split(_linear(attn.to_q, latents_n)), split(k), split(v))
    return _linear(attn.to_out, out.reshape(2, 4, -1))

  actual = nnx.jit(lambda m, x, y: m(x, y))(attn, x_BTD, latents_BND)
  ref.assert_close(actual, expected(keys_first=True), rel=1e-5)
  assert np.abs(_np(actual) - expected(keys_first=False)).max() > 1e-2


def test_resampler_is_the_perceiver_formula_with_16_latents():
  E, D, dim, B, T = 12, 20, 16, 2, 7
  config = AdapterConfig(
    num_tokens=16,
    embed_dim=E,
    kind="plus",
    resampler_dim=dim,
    resampler_depth=2,
    resampler_head_dim=8,
  )
  resampler = _randomize(Resampler(E, D, config, rngs=nnx.Rngs(0)), seed=6)
  assert resampler.latents[...].shape == (1, 16, dim)
  features_BTE = _randn(7, B, T, E)

  heads = dim // 8
  split = lambda y: y.reshape(y.shape[:-1] + (heads, 8))
  x = _linear(resampler.proj_in, _np(features_BTE))
  latents = np.broadcast_to(_np(resampler.latents[...]), (B, 16, dim))
  for attn, (norm, fc1, _, fc2) in resampler.layers:
    x_n, latents_n = _layer_norm(x, attn.norm1), _layer_norm(latents, attn.norm2)
    k, v = np.split(_linear(attn.to_kv, np.concatenate([x_n, latents_n], axis=1)), 2, axis=-1)
    mixed = _attention(split(_linear(attn.to_q, latents_n)), split(k), split(v))
    latents = _linear(attn.to_out, mixed.reshape(B, 16, -1)) + latents
    latents = _linear(fc2, _gelu(_linear(fc1, _layer_norm(latents, norm)))) + latents
  expected = _layer_norm(_linear(resampler.proj_out, latents), resampler.norm_out)

  actual = nnx.jit(lambda m, x: m(x))(resampler, features_BTE)
  assert actual.shape == (B, 16, D)
  ref.assert_close(actual, expected, rel=1e-5)


def test_full_face_projection_uses_the_exact_gelu():
  E, D = 12, 8
  proj = _randomize(FullFaceProjection(E, D, rngs=nnx.Rngs(0)), seed=8)
  features_BTE = 2.0 * _randn(9, 2, 5, E)
  fc1, _, fc2, norm = proj.proj

  def expected(exact: bool):
    return _layer_norm(_linear(fc2, _gelu(_linear(fc1, _np(features_BTE)), exact)), norm)

  actual = nnx.jit(lambda m, x: m(x))(proj, features_BTE)
  assert actual.shape == (2, 5, D)  # one image token per input token
  ref.assert_close(actual, expected(exact=True), rel=1e-5)
  # The tanh approximation lands about 25 times the tolerance away.
  assert np.abs(_np(actual) - expected(exact=False)).max() > 2e-4
