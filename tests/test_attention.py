"""Attention and decoupled cross-attention against their formulas written out in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ipadapter_jax.models.attention import Attention, ImagePrompt, dot_product_attention
from tests import torch_reference as ref

HEADS, HEAD_DIM, QUERY_DIM, CONTEXT_DIM, IMAGE_DIM = 2, 8, 16, 12, 10


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _attention(q, k, v, bias=0.0):
  """softmax(q k^T / sqrt(K) + bias) v on [B, T, H, K] arrays, in float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1]) + bias
  return np.einsum("bhts,bshk->bthk", _softmax(logits), v)


def _randn(rng, *shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def _layer(seed=0, dtype=jnp.float32, joint_softmax=False):
  layer = Attention(
    QUERY_DIM,
    HEADS,
    HEAD_DIM,
    context_dim=CONTEXT_DIM,
    image_context_dim=IMAGE_DIM,
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=nnx.Rngs(seed),
  )
  # A non-zero output bias, so that adding it once (after merging heads) is checked too.
  layer.to_out.bias.set_value(0.1 * jax.random.normal(jax.random.key(seed + 1), (QUERY_DIM,)))
  layer.ip_index, layer.joint_softmax = 0, joint_softmax
  return layer


def _inputs(seed=0, dtype=jnp.float32):
  """x [2, 5, 16], text context [2, 7, 12] and image tokens [2, 3, 10]."""
  rng = np.random.default_rng(seed)
  return (
    _randn(rng, 2, 5, QUERY_DIM, dtype=dtype),
    _randn(rng, 2, 7, CONTEXT_DIM, dtype=dtype),
    _randn(rng, 2, 3, IMAGE_DIM, dtype=dtype),
  )


def _prompt(layer, tokens, scale):
  return ImagePrompt((layer.image_kv(tokens),), jnp.asarray([scale], jnp.float32))


def _np_projections(layer, x, ctx, tokens):
  """q, k_text, v_text, k_img, v_img [B, ., H, K] from the layer's kernels, in float64."""

  def project(linear, a):
    y = np.asarray(a, np.float64) @ np.asarray(linear.kernel[...], np.float64)
    return y.reshape(y.shape[:-1] + (HEADS, HEAD_DIM))

  return (
    project(layer.to_q, x),
    project(layer.to_k, ctx),
    project(layer.to_v, ctx),
    project(layer.to_k_ip, tokens),
    project(layer.to_v_ip, tokens),
  )


def _np_out(layer, mixed_BTHK):
  merged = mixed_BTHK.reshape(mixed_BTHK.shape[:2] + (-1,))
  return merged @ np.asarray(layer.to_out.kernel[...], np.float64) + np.asarray(
    layer.to_out.bias[...], np.float64
  )


@pytest.mark.parametrize("with_bias", [False, True])
def test_dot_product_attention_is_the_softmax_formula(with_bias):
  rng = np.random.default_rng(0)
  q, k, v = _randn(rng, 2, 5, 3, 8), _randn(rng, 2, 7, 3, 8), _randn(rng, 2, 7, 3, 8)
  bias = _randn(rng, 7) if with_bias else None
  actual = dot_product_attention(q, k, v, bias=bias)
  expected = _attention(q, k, v, 0.0 if bias is None else np.asarray(bias, np.float64))
  ref.assert_close(actual, expected, rel=1e-5)


def test_causal_attention_sees_only_earlier_tokens():
  rng = np.random.default_rng(1)
  q, k, v = (_randn(rng, 1, 6, 2, 4) for _ in range(3))
  future = np.triu(np.ones((6, 6), bool), 1)
  ref.assert_close(
    dot_product_attention(q, k, v, is_causal=True),
    _attention(q, k, v, np.where(future, -np.inf, 0.0)),
    rel=1e-5,
  )


def test_bfloat16_inputs_match_the_formula():
  rng = np.random.default_rng(2)
  q, k, v = (_randn(rng, 2, 9, 2, 16, dtype=jnp.bfloat16) for _ in range(3))
  actual = dot_product_attention(q, k, v)
  assert actual.dtype == jnp.bfloat16
  # The probabilities and the output are bfloat16 (8 significant bits): about 1% of the scale.
  ref.assert_close(actual, _attention(q, k, v), rel=1e-2, atol_cap=1e-2)


def test_bfloat16_inputs_get_float32_logits():
  # Logits 96 and 96.75 (exact in float32, not in bfloat16, which rounds 96.75 to 96.5 or 97):
  # value 1 gets weight sigmoid(0.75) = 0.679 with float32 logits, 0.62 or 0.73 with bf16 ones.
  q = jnp.full((1, 1, 1, 1), 96.0, jnp.bfloat16)
  k = jnp.asarray([1.0, 1.0078125], jnp.bfloat16).reshape(1, 2, 1, 1)
  v = jnp.asarray([0.0, 1.0], jnp.bfloat16).reshape(1, 2, 1, 1)
  out = float(dot_product_attention(q, k, v)[0, 0, 0, 0])
  assert abs(out - 1 / (1 + np.exp(-0.75))) < 4e-3  # one bfloat16 step at 0.68


def test_decoupled_attention_is_text_plus_scaled_image_attention():
  layer, (x, ctx, tokens), scale = _layer(), _inputs(), 0.6
  q, k_text, v_text, k_img, v_img = _np_projections(layer, x, ctx, tokens)
  expected = _np_out(layer, _attention(q, k_text, v_text) + scale * _attention(q, k_img, v_img))
  ref.assert_close(layer(x, ctx, _prompt(layer, tokens, scale)), expected, rel=1e-5)


def test_layer_reads_its_own_entry_of_the_image_prompt():
  layer, (x, ctx, tokens), scales = _layer(), _inputs(), [3.0, 0.4]
  layer.ip_index = 1
  other_tokens = jnp.flip(tokens, axis=1) * 2.0
  prompt = ImagePrompt(
    (layer.image_kv(other_tokens), layer.image_kv(tokens)), jnp.asarray(scales, jnp.float32)
  )
  q, k_text, v_text, k_img, v_img = _np_projections(layer, x, ctx, tokens)
  expected = _np_out(layer, _attention(q, k_text, v_text) + 0.4 * _attention(q, k_img, v_img))
  ref.assert_close(layer(x, ctx, prompt), expected, rel=1e-5)


def test_image_keys_and_values_are_the_projected_tokens():
  layer, (x, ctx, tokens) = _layer(), _inputs()
  k_img, v_img = layer.image_kv(tokens)
  _, _, _, k_expected, v_expected = _np_projections(layer, x, ctx, tokens)
  assert k_img.shape == (2, 3, HEADS, HEAD_DIM)
  ref.assert_close(k_img, k_expected, rel=1e-5)
  ref.assert_close(v_img, v_expected, rel=1e-5)


@pytest.mark.parametrize("joint_softmax,scale", [(False, 0.0), (True, 0.0), (True, -0.5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scale_zero_is_the_base_attention_exactly(joint_softmax, scale, dtype):
  layer = _layer(dtype=dtype, joint_softmax=joint_softmax)
  x, ctx, tokens = _inputs(dtype=dtype)
  with_image = nnx.jit(lambda layer, p: layer(x, ctx, p))(layer, _prompt(layer, tokens, scale))
  base = nnx.jit(lambda layer: layer(x, ctx))(layer)
  assert np.all(np.isfinite(np.asarray(with_image, np.float32)))
  np.testing.assert_array_equal(np.asarray(with_image, np.float32), np.asarray(base, np.float32))


def test_simple_adapter_scale_one_is_one_softmax_over_text_and_image_keys():
  layer, (x, ctx, tokens) = _layer(joint_softmax=True), _inputs()
  q, k_text, v_text, k_img, v_img = _np_projections(layer, x, ctx, tokens)
  joint = _attention(q, np.concatenate([k_text, k_img], 1), np.concatenate([v_text, v_img], 1))
  out = layer(x, ctx, _prompt(layer, tokens, 1.0))
  ref.assert_close(out, _np_out(layer, joint), rel=1e-5)

  # Bit for bit the unbiased joint softmax: training at scale 1 sees no trace of the bias.
  split = lambda a: a.reshape(a.shape[:-1] + (HEADS, HEAD_DIM))
  k_ip, v_ip = layer.image_kv(tokens)
  plain = dot_product_attention(
    split(layer.to_q(x)),
    jnp.concatenate([split(layer.to_k(ctx)), k_ip], axis=1),
    jnp.concatenate([split(layer.to_v(ctx)), v_ip], axis=1),
  )
  np.testing.assert_array_equal(out, layer.to_out(plain.reshape(2, 5, -1)))


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_simple_adapter_scale_is_a_log_bias_on_the_image_logits(scale):
  layer, (x, ctx, tokens) = _layer(joint_softmax=True), _inputs()
  q, k_text, v_text, k_img, v_img = _np_projections(layer, x, ctx, tokens)
  bias = np.concatenate([np.zeros(k_text.shape[1]), np.full(k_img.shape[1], np.log(scale))])
  joint = _attention(
    q, np.concatenate([k_text, k_img], 1), np.concatenate([v_text, v_img], 1), bias
  )
  ref.assert_close(layer(x, ctx, _prompt(layer, tokens, scale)), _np_out(layer, joint), rel=1e-5)


def test_simple_adapter_scale_zero_has_finite_zero_image_gradients():
  layer, (x, ctx, tokens) = _layer(joint_softmax=True), _inputs()

  def loss(tokens, scale):
    return jnp.sum(layer(x, ctx, _prompt(layer, tokens, scale)) ** 2)

  grad_tokens, grad_scale = jax.grad(loss, argnums=(0, 1))(tokens, jnp.float32(0.0))
  np.testing.assert_array_equal(np.asarray(grad_tokens), 0.0)  # the image tokens are removed
  assert np.isfinite(float(grad_scale))
  assert np.abs(np.asarray(jax.grad(loss)(tokens, jnp.float32(0.5)))).max() > 0
