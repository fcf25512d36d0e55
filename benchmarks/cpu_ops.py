r"""Where a CPU step's time goes: the sd15-small UNet's main operations, XLA against PyTorch.

  python benchmarks/cpu_ops.py
  python benchmarks/cpu_ops.py --backward   # only the chunked attention's backward variants

Each operation at the shapes it has in the sd15-small UNet forward (batch 4): 3x3 convolutions
at every level, the self-attention at 32x32, and a dense layer, timed alone (median of repeats)
in JAX (jit, NHWC) and PyTorch (NCHW, oneDNN), with the ratio. benchmarks/RESULTS.md explains
the CPU rows of speed.py with it.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import speed  # benchmarks/ is the script's own folder
import torch

median_time = functools.partial(speed.median_time, repeats=20)


def conv(batch: int, size: int, channels: int):
  x = np.random.default_rng(0).standard_normal((batch, size, size, channels), np.float32)
  w = np.random.default_rng(1).standard_normal((3, 3, channels, channels), np.float32)
  f = jax.jit(
    lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  xj, wj = jnp.asarray(x), jnp.asarray(w)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
  with torch.no_grad():
    t = median_time(lambda: torch.nn.functional.conv2d(xt, wt, padding=1))
  return median_time(lambda: f(xj, wj).block_until_ready()), t


def attention(batch: int, tokens: int, heads: int, head_dim: int):
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((batch, tokens, heads, head_dim), np.float32) for _ in range(3))
  f = jax.jit(jax.nn.dot_product_attention)
  qj, kj, vj = map(jnp.asarray, (q, k, v))
  qt, kt, vt = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()) for a in (q, k, v))
  with torch.no_grad():
    t = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
  return median_time(lambda: f(qj, kj, vj).block_until_ready()), t


def conv_layouts(batch: int, size: int, channels: int):
  """(layout, seconds) of the same 3x3 convolution in the layouts XLA:CPU accepts."""
  x = np.random.default_rng(0).standard_normal((batch, size, size, channels), np.float32)
  w = np.random.default_rng(1).standard_normal((3, 3, channels, channels), np.float32)
  rows = []
  for name, (lhs, rhs), xt, wt in [
    ("NHWC / HWIO (this project)", ("NHWC", "HWIO"), x, w),
    ("NCHW / OIHW (PyTorch's)", ("NCHW", "OIHW"), x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)),
    ("NHWC / OHWI", ("NHWC", "OHWI"), x, w.transpose(3, 0, 1, 2)),
  ]:
    f = jax.jit(
      lambda a, b, lhs=lhs, rhs=rhs: jax.lax.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=(lhs, rhs, lhs)
      )
    )
    a, b = jnp.asarray(np.ascontiguousarray(xt)), jnp.asarray(np.ascontiguousarray(wt))
    rows.append((name, median_time(lambda: f(a, b).block_until_ready())))
  return rows


# XLA:CPU options that change code generation or fusion, tried one at a time as per-program
# compiler options (so nothing leaks into other programs).
XLA_CPU_OPTIONS = (
  {"xla_cpu_use_thunk_runtime": False},
  {"xla_cpu_use_fusion_emitters": False},
  {"xla_cpu_prefer_vector_width": 512},
  {"xla_cpu_multi_thread_eigen": False},
  {"xla_cpu_enable_concurrency_optimized_scheduler": True},
)


def with_options(fn, args):
  """(options, seconds or the reason it could not compile) for fn under each XLA_CPU_OPTIONS."""
  rows = []
  for options in ({},) + XLA_CPU_OPTIONS:
    try:
      compiled = jax.jit(fn).lower(*args).compile(compiler_options=options or None)
    except Exception as e:  # an option this XLA does not know
      rows.append((options, f"not accepted ({type(e).__name__})"))
      continue
    rows.append((options, median_time(lambda: jax.block_until_ready(compiled(*args)))))
  return rows


def _attention_variants():
  """name -> f(q, k, v) on [B, T, H, K]: what benchmarks/RESULTS.md's attention rows compare."""
  from ipadapter_jax.models import attention_kernels as kernels

  def einsum_bhts(q, k, v):  # one transpose to [B, H, T, K], q scaled before the logits
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = jnp.einsum("bhtk,bhsk->bhts", q * q.shape[-1] ** -0.5, k)
    return jnp.einsum("bhts,bhsk->bhtk", jax.nn.softmax(logits, axis=-1), v).transpose(0, 2, 1, 3)

  variants = {
    "jax.nn.dot_product_attention (XLA)": jax.nn.dot_product_attention,
    "einsum, [B, H, T, K], q scaled first": einsum_bhts,
    "attention_kernels.xla_attention (logits scaled)": kernels.xla_attention,
  }
  for chunk in (64, 128, 256, 512):
    variants[f"chunked, {chunk} queries"] = functools.partial(
      kernels.chunked_attention, chunk=chunk
    )
  return variants


def attention_variants(batch: int, tokens: int, heads: int, head_dim: int, backward: bool):
  """(name, seconds) for each variant; with `backward`, forward + gradient of sum(out * g)."""
  rng = np.random.default_rng(0)
  q, k, v, g = (
    jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim), np.float32)) for _ in range(4)
  )
  rows = []
  for name, fn in _attention_variants().items():
    if backward:
      f = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * g), argnums=(0, 1, 2)))
    else:
      f = jax.jit(fn)
    rows.append((name, median_time(lambda: jax.block_until_ready(f(q, k, v)))))
  return rows


def attention_torch(batch: int, tokens: int, heads: int, head_dim: int, backward: bool) -> float:
  rng = np.random.default_rng(0)
  q, k, v, g = (
    torch.from_numpy(rng.standard_normal((batch, heads, tokens, head_dim), np.float32))
    for _ in range(4)
  )
  if not backward:
    with torch.no_grad():
      return median_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
  for x in (q, k, v):
    x.requires_grad_(True)

  def step():
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.autograd.grad((out * g).sum(), (q, k, v))

  return median_time(step)


def _backward_variants():
  """name -> f(q, k, v): the chunked kernel's forward with each backward that was tried."""
  from ipadapter_jax.models import attention_kernels as kernels

  f32 = dict(preferred_element_type=jnp.float32)

  def prepared(residuals, dout_BTHK):
    q_BTHK, k_BSHK, v_BSHK, out_BTHK, lse_BHT = residuals
    to_BHTK = lambda x: x.transpose(0, 2, 1, 3)
    q = to_BHTK(q_BTHK) * (kernels._LOG2E / q_BTHK.shape[-1] ** 0.5)
    dout = to_BHTK(dout_BTHK)
    return q, dout, jnp.sum(to_BHTK(out_BTHK) * dout, axis=-1), lse_BHT

  def over_queries(residuals, dout_BTHK):  # dk and dv summed over the query chunks
    q, dout, delta, lse = prepared(residuals, dout_BTHK)
    k, v = (x.transpose(0, 2, 1, 3) for x in residuals[1:3])
    # [B, H, T, ...] -> [T / 128, B, H, 128, ...]
    chunk = lambda x: x.reshape(x.shape[:2] + (-1, 128) + x.shape[3:]).transpose(
      (2, 0, 1) + tuple(range(3, x.ndim + 1))
    )

    def one(carry, xs):
      q_c, dout_c, lse_c, delta_c = xs
      p = jnp.exp2(jnp.einsum("bhqk,bhsk->bhqs", q_c, k, **f32) - lse_c[..., None])
      ds = p * (jnp.einsum("bhqk,bhsk->bhqs", dout_c, v, **f32) - delta_c[..., None])
      dk = carry[0] + jnp.einsum("bhqs,bhqk->bhsk", ds, q_c, **f32)
      dv = carry[1] + jnp.einsum("bhqs,bhqk->bhsk", p, dout_c, **f32)
      return (dk, dv), jnp.einsum("bhqs,bhsk->bhqk", ds, k, **f32)

    (dk, dv), dq = jax.lax.scan(
      one,
      (jnp.zeros_like(k), jnp.zeros_like(v)),
      (chunk(q), chunk(dout), chunk(lse[..., None])[..., 0], chunk(delta[..., None])[..., 0]),
    )
    dq = dq.transpose(1, 2, 0, 3, 4).reshape(q.shape)
    return _grads(residuals, dq, dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3))

  def over_keys(residuals, dout_BTHK):  # the kernel's order, dq kept as [B, H, T, K]
    q, dout, delta, lse = prepared(residuals, dout_BTHK)
    keys, values = (kernels._chunks(x, 128) for x in residuals[1:3])

    def one(dq, kv):
      k_c, v_c = kv
      p = jnp.exp2(jnp.einsum("bhsk,bhtk->bhst", k_c, q, **f32) - lse[:, :, None])
      ds = p * (jnp.einsum("bhsk,bhtk->bhst", v_c, dout, **f32) - delta[:, :, None])
      dk, dv = (jnp.einsum("bhst,bhtk->bhsk", x, y, **f32) for x, y in ((ds, q), (p, dout)))
      return dq + jnp.einsum("bhst,bhsk->bhtk", ds, k_c, **f32), (dk, dv)

    dq, (dk, dv) = jax.lax.scan(one, jnp.zeros(q.shape), (keys, values))
    S = residuals[1].shape[1]
    return _grads(residuals, dq, kernels._unchunk(dk, S), kernels._unchunk(dv, S))

  def _grads(residuals, dq_BHTK, dk_BSHK, dv_BSHK):
    K = residuals[0].shape[-1]
    return dq_BHTK.transpose(0, 2, 1, 3) / K**0.5, dk_BSHK / kernels._LOG2E, dv_BSHK

  def with_backward(backward):
    fn = jax.custom_vjp(lambda q, k, v: kernels.chunked_attention(q, k, v))
    fn.defvjp(lambda q, k, v: kernels._chunked_forward(q, k, v, kernels.TRAINING_CHUNK), backward)
    return fn

  return {
    "over 128-query chunks, dk and dv summed": with_backward(over_queries),
    "over 128-key chunks, dq as [B, H, T, K]": with_backward(over_keys),
    "the kernel (128-key chunks, dq as [B, H, K, T])": kernels.chunked_attention,
  }


def backward_variants(shape: tuple[int, int, int, int]):
  """(name, seconds, max abs gradient difference from the kernel's) of forward + backward."""
  rng = np.random.default_rng(0)
  q, k, v, g = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(4))
  grads = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * g), (0, 1, 2)))
  variants = _backward_variants()
  from ipadapter_jax.models.attention_kernels import chunked_attention

  expected = grads(chunked_attention)(q, k, v)
  rows = []
  for name, fn in variants.items():
    f = grads(fn)
    error = max(float(jnp.abs(a - b).max()) for a, b in zip(f(q, k, v), expected))
    rows.append((name, median_time(lambda: jax.block_until_ready(f(q, k, v))), error))
  return rows


def dense(rows: int, features: int):
  rng = np.random.default_rng(0)
  x, w = (
    rng.standard_normal((rows, features), np.float32),
    rng.standard_normal((features, features), np.float32),
  )
  f = jax.jit(jnp.matmul)
  xj, wj, xt, wt = jnp.asarray(x), jnp.asarray(w), torch.from_numpy(x), torch.from_numpy(w)
  with torch.no_grad():
    t = median_time(lambda: xt @ wt)
  return median_time(lambda: f(xj, wj).block_until_ready()), t


def print_backward_variants():
  for shape in ((2, 1024, 8, 8), (1, 4096, 8, 40)):
    torch_time = attention_torch(shape[0], shape[1], shape[2], shape[3], backward=True)
    print(
      f"\nchunked self-attention {list(shape)} [B, T, H, K], forward + backward; torch SDPA "
      f"{torch_time * 1e3:.3f} ms\n| backward | JAX | JAX / PyTorch | max abs difference "
      "from the kernel's gradients |\n|---|---|---|---|"
    )
    for name, seconds, error in backward_variants(shape):
      print(f"| {name} | {seconds * 1e3:.3f} ms | {seconds / torch_time:.2f} | {error:.1e} |")


def main():
  if "--backward" in sys.argv:  # only the chunked kernel's backward variants
    print_backward_variants()
    return
  torch.set_num_threads(torch.get_num_threads())
  rows = [
    ("conv 3x3, 32x32x64", conv(4, 32, 64)),
    ("conv 3x3, 16x16x128", conv(4, 16, 128)),
    ("conv 3x3, 8x8x256", conv(4, 8, 256)),
    ("conv 3x3, 4x4x256", conv(4, 4, 256)),
    ("self-attention, 1024 tokens, 8x8 heads", attention(4, 1024, 8, 8)),
    ("self-attention, 256 tokens, 8x16 heads", attention(4, 256, 8, 16)),
    ("dense 4096x64 @ 64x64", dense(4096, 64)),
    ("dense 256x256 @ 256x256", dense(256, 256)),
  ]
  print(
    f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__}, "
    f"{torch.get_num_threads()} threads"
  )
  print("| operation | JAX | PyTorch | JAX / PyTorch |\n|---|---|---|---|")
  for name, (j, t) in rows:
    print(f"| {name} | {j * 1e3:.3f} ms | {t * 1e3:.3f} ms | {j / t:.2f} |")
  print("\n| conv 3x3, 32x32x64, batch 4, layout | JAX |\n|---|---|")
  for name, seconds in conv_layouts(4, 32, 64):
    print(f"| {name} | {seconds * 1e3:.3f} ms |")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 32, 32, 64), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, 64, 64), np.float32))
  qkv = [jnp.asarray(rng.standard_normal((4, 1024, 8, 8), np.float32)) for _ in range(3)]
  from ipadapter_jax.models.attention_kernels import chunked_attention

  conv_fn = lambda a, b: jax.lax.conv_general_dilated(
    a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  print(
    "\n| XLA:CPU option | conv 3x3 32x32x64 | chunked self-attention [4, 1024, 8, 8] |"
    "\n|---|---|---|"
  )
  for (options, conv_s), (_, attn_s) in zip(
    with_options(conv_fn, (x, w)), with_options(chunked_attention, qkv)
  ):
    show = lambda v: v if isinstance(v, str) else f"{v * 1e3:.3f} ms"
    print(f"| {options or 'defaults'} | {show(conv_s)} | {show(attn_s)} |")
  for backward in (False, True):
    shape = (4, 1024, 8, 8)
    torch_time = attention_torch(*shape, backward)
    what = "forward + backward" if backward else "forward"
    print(
      f"\nself-attention {list(shape)} [B, T, H, K], {what}; torch SDPA "
      f"{torch_time * 1e3:.3f} ms\n| variant | JAX | JAX / PyTorch |\n|---|---|---|"
    )
    for name, seconds in attention_variants(*shape, backward):
      print(f"| {name} | {seconds * 1e3:.3f} ms | {seconds / torch_time:.2f} |")


if __name__ == "__main__":
  main()
