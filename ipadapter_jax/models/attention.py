"""Attention, transformer blocks and IP-Adapter's decoupled cross-attention.

Shape letters as in `ipadapter_jax.models` (docs/conventions.md).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models import attention_kernels as kernels
from ipadapter_jax.models.layers import AdapterParam, Conv2d, GroupNorm, LayerNorm, Linear


class ImagePrompt(NamedTuple):
  """One adapter's image-token keys/values for every decoupled layer, and how they are applied.

  `kv[i]` is the (key, value) pair, each [B, I*N, H, K], of the i-th decoupled layer in
  checkpoint order (down blocks, up blocks, mid block; docs/reference.md §2): the N tokens of each
  of the adapter's I images, concatenated. `scale` has one float32 entry per layer. Optional:
  `weights` [I], one per image, and `masks`, per layer a [B or 1, T, I] array of each image's
  region at that layer's resolution (docs/composition.md). All are ordinary traced values, so new
  images, scales, weights or masks of the same shapes never recompile.
  """

  kv: tuple
  scale: jax.Array
  weights: jax.Array | None = None
  masks: tuple | None = None


def dot_product_attention(
  q_BTHK, k_BSHK, v_BSHK, implementation: str | None = None, *, bias=None, is_causal: bool = False
):
  """softmax(q k^T / sqrt(K) + bias) v; logits and softmax are float32 whatever the input dtype.

  Every attention of the project goes through here. `implementation` None picks the kernel per
  shape and the platform the program is lowered for (`attention_kernels.choose`: chunked on
  CPUs and splash on TPUs for long self-attention, cuDNN for bf16/fp16 on NVIDIA GPUs, XLA
  otherwise); "xla", "chunked", "cudnn" or "splash" force one. `bias` broadcasts against the
  [B, H, T, S] logits (a [S] vector biases each key). Causal attention (CLIP's text tower, 77
  tokens) always takes XLA's path.
  """
  if is_causal:
    return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, bias=bias, is_causal=True)
  return kernels.attention(q_BTHK, k_BSHK, v_BSHK, implementation, bias)


# log(scale) for scale <= 0: a finite stand-in for log(0) = -inf. The image keys' weights still
# underflow to exactly 0 (unless their logits beat the text keys' by about 1e4), and unlike -inf
# it survives a cast to float16 and differentiation without producing NaN.
_LOG_ZERO = -1e4


def _log_scale(scale):
  """log(scale), with _LOG_ZERO for scale <= 0 (the inner where keeps log's gradient finite)."""
  positive = scale > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, scale, 1.0)), _LOG_ZERO)


class Attention(nnx.Module):
  """Multi-head attention (to_q/to_k/to_v/to_out) with an optional image branch.

  With `image_context_dim` set, the layer owns the adapter's `to_k_ip`/`to_v_ip` and, given an
  `ImagePrompt` with this layer's scale s, computes the decoupled cross-attention
  to_out(softmax(Q K_text^T / sqrt(K)) V_text + s * softmax(Q K_img^T / sqrt(K)) V_img):
  two softmaxes sharing Q, so s scales the image branch's output linearly. Several adapters
  add one such branch each (the first adapter's weights live here; the others' keys/values are
  computed by their own `IPAdapter` modules).

  With `joint_softmax` (the paper's "simple adapter" ablation) text and image keys share one
  softmax and s multiplies the image tokens' unnormalised attention weights exp(q.k / sqrt(K)):
  to_out(softmax(Q [K_text; K_img]^T / sqrt(K) + [0; log s]) [V_text; V_img]). s = 1 is the
  plain joint softmax (the training setting); 0 < s < 1 shifts attention mass from the image
  tokens to the text tokens, s > 1 the other way, and the result is renormalised, so it is not
  linear in s. s <= 0 removes the image tokens: the output is the base attention bit for bit.
  """

  def __init__(
    self,
    query_dim: int,
    heads: int,
    head_dim: int,
    *,
    context_dim: int | None = None,
    image_context_dim: int | None = None,
    implementation: str | None = None,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    inner = heads * head_dim
    context_dim = context_dim or query_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.to_q = Linear(query_dim, inner, use_bias=False, **kw)
    self.to_k = Linear(context_dim, inner, use_bias=False, **kw)
    self.to_v = Linear(context_dim, inner, use_bias=False, **kw)
    self.to_out = Linear(inner, query_dim, **kw)
    ip_kw = dict(
      use_bias=False, dtype=dtype, param_dtype=jnp.float32, param_type=AdapterParam, rngs=rngs
    )
    with_adapter = image_context_dim is not None
    self.to_k_ip = Linear(image_context_dim, inner, **ip_kw) if with_adapter else None
    self.to_v_ip = Linear(image_context_dim, inner, **ip_kw) if with_adapter else None
    self.heads = heads
    self.implementation = implementation
    self.ip_index: int | None = None  # set by the UNet: this layer's index in checkpoint order
    self.joint_softmax = False  # set by the UNet for a "simple" adapter

  def _split_heads(self, x):
    """[..., H * K] -> [..., H, K]."""
    return x.reshape(x.shape[:-1] + (self.heads, -1))

  def image_kv(self, image_tokens_BND):
    """Keys and values [B, N, H, K] of the image tokens; they do not depend on the timestep."""
    return (
      self._split_heads(self.to_k_ip(image_tokens_BND)),
      self._split_heads(self.to_v_ip(image_tokens_BND)),
    )

  def __call__(self, x_BTD, context_BSD=None, image_prompt=None):
    """`image_prompt`: an `ImagePrompt`, a tuple of them (one per adapter) or None."""
    context_BSD = x_BTD if context_BSD is None else context_BSD
    q_BTHK = self._split_heads(self.to_q(x_BTD))
    k_BSHK = self._split_heads(self.to_k(context_BSD))
    v_BSHK = self._split_heads(self.to_v(context_BSD))
    out_BTHK = dot_product_attention(q_BTHK, k_BSHK, v_BSHK, self.implementation)
    if image_prompt is not None and self.to_k_ip is not None:
      prompts = (image_prompt,) if isinstance(image_prompt, ImagePrompt) else image_prompt
      if self.joint_softmax:
        if len(prompts) != 1 or prompts[0].masks is not None or prompts[0].weights is not None:
          raise ValueError("a 'simple' adapter takes one image prompt without masks or weights")
        out_BTHK = self._joint_attention(q_BTHK, k_BSHK, v_BSHK, out_BTHK, prompts[0])
      else:
        for prompt in prompts:  # out = text attention + sum over adapters of their branches
          out_BTHK = out_BTHK + self._image_branch(q_BTHK, prompt)
    return self.to_out(out_BTHK.reshape(x_BTD.shape[:-1] + (-1,)))

  def _image_branch(self, q_BTHK, prompt: ImagePrompt):
    """scale * softmax(Q K_img^T / sqrt(K)) V_img for one adapter: one softmax over all of its
    images' tokens, each image's weight multiplying its tokens' unnormalised attention weights;
    with masks, each image its own softmax, weighted and confined to its region."""
    k_BSHK, v_BSHK = (a.astype(q_BTHK.dtype) for a in prompt.kv[self.ip_index])
    scale = prompt.scale[self.ip_index].astype(q_BTHK.dtype)
    if prompt.masks is None:
      bias = None
      if prompt.weights is not None:
        per_image = k_BSHK.shape[1] // prompt.weights.shape[0]
        bias = jnp.repeat(_log_scale(prompt.weights), per_image)
      return scale * dot_product_attention(q_BTHK, k_BSHK, v_BSHK, self.implementation, bias=bias)
    mask_BTI = prompt.masks[self.ip_index].astype(q_BTHK.dtype)
    images = mask_BTI.shape[-1]
    per_image = k_BSHK.shape[1] // images
    out_BTHK = 0.0
    for i in range(images):
      tokens = slice(i * per_image, (i + 1) * per_image)
      weight = scale if prompt.weights is None else scale * prompt.weights[i].astype(scale.dtype)
      attended_BTHK = dot_product_attention(
        q_BTHK, k_BSHK[:, tokens], v_BSHK[:, tokens], self.implementation
      )
      out_BTHK = out_BTHK + weight * (attended_BTHK * mask_BTI[:, :, None, i : i + 1])
    return out_BTHK

  def _joint_attention(self, q_BTHK, k_BSHK, v_BSHK, text_BTHK, prompt: ImagePrompt):
    """The "simple" adapter: text and image keys in one softmax, the image's weighted by s."""
    k_BNHK, v_BNHK = (a.astype(q_BTHK.dtype) for a in prompt.kv[self.ip_index])
    scale = prompt.scale[self.ip_index]
    S, N = k_BSHK.shape[1], k_BNHK.shape[1]
    bias = jnp.concatenate(
      [jnp.zeros((S,), jnp.float32), jnp.broadcast_to(_log_scale(scale), (N,))]
    )
    joint_BTHK = dot_product_attention(
      q_BTHK,
      jnp.concatenate([k_BSHK, k_BNHK], axis=1),
      jnp.concatenate([v_BSHK, v_BNHK], axis=1),
      self.implementation,
      bias=bias,
    )
    # The image keys' weights are exactly 0 at scale 0, but the softmax over S + N keys sums in
    # another order than over S: the text-only result keeps scale 0 bit-exact.
    return jnp.where(scale > 0, joint_BTHK, text_BTHK)


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

  def __init__(
    self,
    dim: int,
    heads: int,
    head_dim: int,
    context_dim: int,
    *,
    image_context_dim: int | None,
    implementation: str | None,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    attn_kw = dict(implementation=implementation, rngs=rngs, **kw)
    self.norm1 = LayerNorm(dim, **kw)
    self.attn1 = Attention(dim, heads, head_dim, **attn_kw)
    self.norm2 = LayerNorm(dim, **kw)
    self.attn2 = Attention(
      dim, heads, head_dim, context_dim=context_dim, image_context_dim=image_context_dim, **attn_kw
    )
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

  def __init__(
    self,
    channels: int,
    heads: int,
    head_dim: int,
    context_dim: int,
    *,
    num_layers: int,
    norm_groups: int,
    use_linear_projection: bool,
    image_context_dim: int | None,
    implementation: str | None,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    inner = heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm = GroupNorm(norm_groups, channels, eps=1e-6, **kw)
    if use_linear_projection:
      self.proj_in = Linear(channels, inner, rngs=rngs, **kw)
      self.proj_out = Linear(inner, channels, rngs=rngs, **kw)
    else:
      self.proj_in = Conv2d(channels, inner, 1, rngs=rngs, **kw)
      self.proj_out = Conv2d(inner, channels, 1, rngs=rngs, **kw)
    self.transformer_blocks = nnx.List(
      [
        BasicTransformerBlock(
          inner,
          heads,
          head_dim,
          context_dim,
          image_context_dim=image_context_dim,
          implementation=implementation,
          rngs=rngs,
          **kw,
        )
        for _ in range(num_layers)
      ]
    )

  def __call__(self, x_BHWC, context_BSD, image_prompt=None):
    B, H, W, _ = x_BHWC.shape
    h_BHWD = self.proj_in(self.norm(x_BHWC))
    h_BTD = h_BHWD.reshape(B, H * W, -1)
    for block in self.transformer_blocks:
      h_BTD = block(h_BTD, context_BSD, image_prompt)
    return self.proj_out(h_BTD.reshape(B, H, W, -1)) + x_BHWC
