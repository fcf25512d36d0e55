"""Attention, transformer blocks and IP-Adapter's decoupled cross-attention.

Shape letters: B batch, T query tokens, S context tokens, N image tokens, H heads, K head dim,
D model width, C channels.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.layers import AdapterParam, Conv2d, GroupNorm, LayerNorm, Linear


class ImagePrompt(NamedTuple):
  """Image-token keys/values for every decoupled layer, and each layer's adapter scale.

  `kv[i]` is the (key, value) pair, each [B, N, H, K], of the layer with checkpoint index i
  (REFERENCE order: down blocks, up blocks, mid block); `scale` has one float32 entry per layer.
  Both are ordinary traced values, so new images or scales never trigger a recompilation.
  """
  kv: tuple
  scale: jax.Array


def dot_product_attention(q_BTHK, k_BSHK, v_BSHK, implementation: str | None = None, *,
                          is_causal: bool = False):
  """softmax(q k^T / sqrt(K)) v; logits and softmax are float32 whatever the input dtype.

  Every attention of the project goes through here, so switching to the cuDNN kernel
  (`implementation="cudnn"`, bf16/fp16 on NVIDIA GPUs) is one argument.
  """
  return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, is_causal=is_causal,
                                     implementation=implementation)


class Attention(nnx.Module):
  """Multi-head attention (to_q/to_k/to_v/to_out) with an optional decoupled image branch.

  With `image_context_dim` set, the layer owns the adapter's `to_k_ip`/`to_v_ip` and computes
  to_out(softmax(Q K_text) V_text + scale * softmax(Q K_img) V_img): two softmaxes sharing Q.
  With `joint_softmax` (the "simple adapter" ablation) it computes
  to_out(softmax(Q [K_text; K_img]) [V_text; scale * V_img]) instead.
  """

  def __init__(self, query_dim: int, heads: int, head_dim: int, *, context_dim: int | None = None,
               image_context_dim: int | None = None, implementation: str | None = None,
               dtype, param_dtype, rngs: nnx.Rngs):
    inner = heads * head_dim
    context_dim = context_dim or query_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.to_q = Linear(query_dim, inner, use_bias=False, **kw)
    self.to_k = Linear(context_dim, inner, use_bias=False, **kw)
    self.to_v = Linear(context_dim, inner, use_bias=False, **kw)
    self.to_out = Linear(inner, query_dim, **kw)
    ip_kw = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, param_type=AdapterParam,
                 rngs=rngs)
    with_adapter = image_context_dim is not None
    self.to_k_ip = Linear(image_context_dim, inner, **ip_kw) if with_adapter else None
    self.to_v_ip = Linear(image_context_dim, inner, **ip_kw) if with_adapter else None
    self.heads = heads
    self.implementation = implementation
    self.ip_index: int | None = None  # set by the UNet: this layer's index in checkpoint order
    self.joint_softmax = False  # set by the UNet for a "simple" adapter

  def _split_heads(self, x_BSD):
    return x_BSD.reshape(x_BSD.shape[:-1] + (self.heads, -1))

  def image_kv(self, image_tokens_BND):
    """Keys and values [B, N, H, K] of the image tokens; they do not depend on the timestep."""
    return (self._split_heads(self.to_k_ip(image_tokens_BND)),
            self._split_heads(self.to_v_ip(image_tokens_BND)))

  def __call__(self, x_BTD, context_BSD=None, image_prompt: ImagePrompt | None = None):
    context_BSD = x_BTD if context_BSD is None else context_BSD
    q_BTHK = self._split_heads(self.to_q(x_BTD))
    k_BSHK = self._split_heads(self.to_k(context_BSD))
    v_BSHK = self._split_heads(self.to_v(context_BSD))
    if image_prompt is None or self.to_k_ip is None:
      out_BTHK = dot_product_attention(q_BTHK, k_BSHK, v_BSHK, self.implementation)
    else:
      k_BNHK, v_BNHK = (a.astype(q_BTHK.dtype) for a in image_prompt.kv[self.ip_index])
      scale = image_prompt.scale[self.ip_index].astype(q_BTHK.dtype)
      if self.joint_softmax:
        out_BTHK = dot_product_attention(
            q_BTHK, jnp.concatenate([k_BSHK, k_BNHK], axis=1),
            jnp.concatenate([v_BSHK, scale * v_BNHK], axis=1), self.implementation)
      else:
        out_BTHK = (dot_product_attention(q_BTHK, k_BSHK, v_BSHK, self.implementation)
                    + scale * dot_product_attention(q_BTHK, k_BNHK, v_BNHK, self.implementation))
    return self.to_out(out_BTHK.reshape(x_BTD.shape[:-1] + (-1,)))


class GEGLU(nnx.Module):
  """proj to 2 x inner, then value * GELU(gate) with the exact (erf) GELU."""

  def __init__(self, dim: int, inner: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.proj = Linear(dim, 2 * inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    value, gate = jnp.split(self.proj(x), 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  """GEGLU MLP with 4x expansion (diffusers' ff.net.0 / ff.net.2)."""

  def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.geglu = GEGLU(dim, 4 * dim, **kw)
    self.proj_out = Linear(4 * dim, dim, **kw)

  def __call__(self, x):
    return self.proj_out(self.geglu(x))


class BasicTransformerBlock(nnx.Module):
  """Pre-LN self-attention (attn1), cross-attention (attn2) and feed-forward, each residual."""

  def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, *,
               image_context_dim: int | None, implementation: str | None, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    attn_kw = dict(implementation=implementation, rngs=rngs, **kw)
    self.norm1 = LayerNorm(dim, **kw)
    self.attn1 = Attention(dim, heads, head_dim, **attn_kw)
    self.norm2 = LayerNorm(dim, **kw)
    self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim,
                           image_context_dim=image_context_dim, **attn_kw)
    self.norm3 = LayerNorm(dim, **kw)
    self.ff = FeedForward(dim, rngs=rngs, **kw)

  def __call__(self, x_BTD, context_BSD, image_prompt=None):
    x_BTD = x_BTD + self.attn1(self.norm1(x_BTD))
    x_BTD = x_BTD + self.attn2(self.norm2(x_BTD), context_BSD, image_prompt)
    return x_BTD + self.ff(self.norm3(x_BTD))


class Transformer2DModel(nnx.Module):
  """GroupNorm -> proj_in -> transformer blocks over the H*W tokens -> proj_out, plus the input.

  proj_in/proj_out are 1x1 convolutions (SD1.x) or linears (`use_linear_projection`, SD2/SDXL);
  on NHWC both act on the channel axis, so the only difference is the stored kernel's layout.
  """

  def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, *,
               num_layers: int, norm_groups: int, use_linear_projection: bool,
               image_context_dim: int | None, implementation: str | None, dtype, param_dtype,
               rngs: nnx.Rngs):
    inner = heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm = GroupNorm(norm_groups, channels, eps=1e-6, **kw)
    if use_linear_projection:
      self.proj_in = Linear(channels, inner, rngs=rngs, **kw)
      self.proj_out = Linear(inner, channels, rngs=rngs, **kw)
    else:
      self.proj_in = Conv2d(channels, inner, 1, rngs=rngs, **kw)
      self.proj_out = Conv2d(inner, channels, 1, rngs=rngs, **kw)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads, head_dim, context_dim,
                              image_context_dim=image_context_dim, implementation=implementation,
                              rngs=rngs, **kw)
        for _ in range(num_layers)])

  def __call__(self, x_BHWC, context_BSD, image_prompt=None):
    B, H, W, _ = x_BHWC.shape
    h_BHWD = self.proj_in(self.norm(x_BHWC))
    h_BTD = h_BHWD.reshape(B, H * W, -1)
    for block in self.transformer_blocks:
      h_BTD = block(h_BTD, context_BSD, image_prompt)
    return self.proj_out(h_BTD.reshape(B, H, W, -1)) + x_BHWC
