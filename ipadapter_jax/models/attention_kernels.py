"""The attention kernels behind `attention.dot_product_attention`, and the per-platform choice.

- "xla": softmax(q k^T / sqrt(K) + bias) v as two einsums around a materialised float32
  softmax over [B, H, T, S] logits.
- "chunked": queries in chunks, each chunk's logits, exp2 and value product done before the
  next, the softmax normalised after the value product. On XLA:CPU this keeps a chunk's
  logits in cache instead of streaming [B, H, T, T] through memory (benchmarks/cpu_ops.py).
  Its custom VJP goes over the keys in chunks instead, recomputing each chunk's probabilities
  from the saved log-sum-exp, so the backward never stores [B, H, T, T] either.
- "cudnn": cuDNN's fused flash attention (NVIDIA GPUs, bfloat16/float16).
- "splash": JAX's Pallas splash attention kernel (TPUs; `interpret=True` runs it anywhere).

`choose` picks one when none is asked for: cuDNN for bf16/fp16 on NVIDIA GPUs, splash on TPUs
and chunked on CPUs for self-attention of at least `LONG` tokens, XLA otherwise (cross-attention
over 77 + N tokens is small: a plain einsum). docs/performance.md has the measurements.

The platform is that of the devices a program is compiled for, not the host's: a program
traced under `compiling_for(mesh)` (`on_mesh` wraps a function so) takes the kernels of the
mesh's platform, so a TPU program compiled on a CPU host (benchmarks/tpu_compile.py) holds the
splash kernel. A Pallas kernel cannot be partitioned by XLA, so over a mesh of several devices
splash runs inside `shard_map` over the batch axes, each device on its own examples.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "splash")
LONG = 1024  # keys from which self-attention takes a blocked kernel (CPU and TPU)
# Queries per chunk: 64 x 1,024 keys of float32 logits are 256 KiB a head, an eighth of a 2 MiB
# L2; 128 queries measured 3.4x slower (benchmarks/RESULTS.md).
CHUNK = 64
# Differentiated, the forward takes 128 queries a chunk and the backward 128 keys: at
# [2, 1024, 8, 8] the pair measured 53 ms, against 60 ms with 64 queries forward and 61-82 ms
# with 96, 160 or 192 keys (timed before dq was kept transposed, which made it 25.7 ms).
TRAINING_CHUNK = 128
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Target:
  """What a program is compiled for: its devices' platform and, when sharded, the mesh and the
  mesh axes its batch is split over."""
  platform: str
  mesh: jax.sharding.Mesh | None = None
  batch_axes: tuple[str, ...] = ()

  @property
  def batch_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.batch_axes) if self.mesh else 1


_TARGET: contextvars.ContextVar[Target | None] = contextvars.ContextVar("target", default=None)


def target() -> Target:
  """The target of the program being traced: set by `compiling_for`, else the host's backend."""
  return _TARGET.get() or Target(jax.default_backend())


@contextlib.contextmanager
def compiling_for(mesh: jax.sharding.Mesh, batch_axes: tuple[str, ...] | None = None):
  """Traces within take the kernels of `mesh`'s platform, split over `batch_axes` (default:
  every axis of the mesh, as the train step and the sampling program split their batch)."""
  axes = tuple(mesh.axis_names) if batch_axes is None else tuple(batch_axes)
  token = _TARGET.set(Target(mesh.devices.flat[0].platform, mesh, axes))
  try:
    yield
  finally:
    _TARGET.reset(token)


def on_mesh(fn, mesh: jax.sharding.Mesh):
  """`fn` traced under `compiling_for(mesh)`, for `jax.jit`."""
  @functools.wraps(fn)
  def traced_for_mesh(*args, **kwargs):
    with compiling_for(mesh):
      return fn(*args, **kwargs)
  return traced_for_mesh


def choose(implementation: str | None, q_BTHK, k_BSHK, *, has_bias: bool) -> str:
  """The kernel for one attention call; refuses an impossible explicit choice in one line.

  The blocked kernels ("chunked", "splash") only ever take long self-attention, asked for or
  not: everything shorter (cross-attention over 77 + N tokens, low-resolution levels) is a
  plain XLA einsum.
  """
  platform = target().platform
  half = q_BTHK.dtype in (jnp.bfloat16, jnp.float16)
  head_dim = q_BTHK.shape[-1]
  blocked = (q_BTHK.shape[1] == k_BSHK.shape[1] >= LONG) and not has_bias
  if implementation is None:
    if platform == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128:
      return "cudnn"
    if blocked:
      return {"cpu": "chunked", "tpu": "splash"}.get(platform, "xla")
    return "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of "
                     f"{', '.join(IMPLEMENTATIONS)} (or None: chosen per platform)")
  if implementation == "cudnn":
    if platform != "gpu":
      raise ValueError(f"cuDNN attention needs an NVIDIA GPU; this runs on {platform} "
                       "(leave attention_implementation unset to choose per platform)")
    if not half:
      raise ValueError(f"cuDNN attention needs bfloat16 or float16 inputs, got {q_BTHK.dtype} "
                       "(run the model with dtype=jnp.bfloat16, or use 'xla')")
  if implementation in ("chunked", "splash") and not blocked:
    return "xla"
  return implementation


def xla_attention(q_BTHK, k_BSHK, v_BSHK, bias=None):
  """The einsum formulation, heads moved ahead of the tokens first: XLA:CPU ran it 1.2-5x faster
  than `jax.nn.dot_product_attention` at the UNet's shapes (benchmarks/RESULTS.md). float32
  logits and softmax; probabilities cast to v's dtype for the value product, as jax.nn does."""
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BTHK, k_BSHK, v_BSHK))
  logits = jnp.einsum("bhtk,bhsk->bhts", q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(1.0 / math.sqrt(q.shape[-1]))
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhts,bhsk->bhtk", probs, v, preferred_element_type=jnp.float32)
  return out.transpose(0, 2, 1, 3).astype(q_BTHK.dtype)


def _chunks(x_BTHK, chunk: int):
  """[B, T, H, K] -> [T / chunk, B, H, chunk, K] (T padded up to a multiple of chunk)."""
  B, T, H, K = x_BTHK.shape
  pad = -T % chunk
  x_BTHK = jnp.pad(x_BTHK, ((0, 0), (0, pad), (0, 0), (0, 0)))
  return x_BTHK.reshape(B, (T + pad) // chunk, chunk, H, K).transpose(1, 0, 3, 2, 4)


def _unchunk(x_CBHQK, T: int):
  """_chunks' inverse: [T' / chunk, B, H, chunk, K] -> [B, T, H, K]."""
  C, B, H, Q, K = x_CBHQK.shape
  return x_CBHQK.transpose(1, 0, 3, 2, 4).reshape(B, C * Q, H, K)[:, :T]


def _chunk_forward(q_BHQK, k_BHSK, v_BHSK):
  """One chunk: (output [B, H, Q, K], log2-sum-exp2 [B, H, Q]); q is pre-scaled by
  log2(e) / sqrt(K), so exp2 of the logits is exp of the true ones."""
  logits = jnp.einsum("bhqk,bhsk->bhqs", q_BHQK, k_BHSK, preferred_element_type=jnp.float32)
  top = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp2(logits - top)
  total = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhqs,bhsk->bhqk", p.astype(v_BHSK.dtype), v_BHSK,
                   preferred_element_type=jnp.float32) / total  # normalised after the product
  return out, (top + jnp.log2(total))[..., 0]


def _prepare(q_BTHK, k_BSHK, v_BSHK, chunk):
  scale = _LOG2E / math.sqrt(q_BTHK.shape[-1])
  q = _chunks((q_BTHK.astype(jnp.float32) * scale).astype(q_BTHK.dtype), chunk)
  return q, k_BSHK.transpose(0, 2, 1, 3), v_BSHK.transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_attention(q_BTHK, k_BSHK, v_BSHK, chunk: int = CHUNK):
  """softmax(q k^T / sqrt(K)) v, `chunk` queries at a time; the output has q's dtype.
  Under differentiation both passes chunk TRAINING_CHUNK queries instead."""
  return _chunked_forward(q_BTHK, k_BSHK, v_BSHK, chunk)[0]


def _chunked_forward(q_BTHK, k_BSHK, v_BSHK, chunk):
  q, k, v = _prepare(q_BTHK, k_BSHK, v_BSHK, chunk)
  out, lse_CBHQ = jax.lax.map(lambda q_BHQK: _chunk_forward(q_BHQK, k, v), q)
  T = q_BTHK.shape[1]
  out_BTHK = _unchunk(out, T).astype(q_BTHK.dtype)
  C, B, H, Q = lse_CBHQ.shape
  lse_BHT = lse_CBHQ.transpose(1, 2, 0, 3).reshape(B, H, C * Q)[..., :T]
  return out_BTHK, (q_BTHK, k_BSHK, v_BSHK, out_BTHK, lse_BHT)


def _chunked_backward(chunk, residuals, dout_BTHK):
  """Key chunks this time: each chunk's transposed probabilities [B, H, chunk, T] recomputed
  from the saved log-sum-exp, its dk and dv whole, dq summed over the chunks. XLA:CPU ran this
  2-3x faster than chunking the queries (benchmarks/RESULTS.md)."""
  del chunk
  q_BTHK, k_BSHK, v_BSHK, out_BTHK, lse_BHT = residuals
  f32 = dict(preferred_element_type=jnp.float32)
  to_BHTK = lambda x: x.astype(jnp.float32).transpose(0, 2, 1, 3)
  q = to_BHTK(q_BTHK) * (_LOG2E / math.sqrt(q_BTHK.shape[-1]))  # logits in log2 units
  dout = to_BHTK(dout_BTHK)
  # rowsum(dout * out): the softmax's correction term, per query.
  delta_BHT = jnp.sum(to_BHTK(out_BTHK) * dout, axis=-1)
  keys = _chunks(k_BSHK.astype(jnp.float32), TRAINING_CHUNK)
  values = _chunks(v_BSHK.astype(jnp.float32), TRAINING_CHUNK)

  def one(dq_BHKT, kv):
    k_BHSK, v_BHSK = kv
    p_BHST = jnp.exp2(jnp.einsum("bhsk,bhtk->bhst", k_BHSK, q, **f32) - lse_BHT[:, :, None])
    dv = jnp.einsum("bhst,bhtk->bhsk", p_BHST, dout, **f32)
    dp_BHST = jnp.einsum("bhsk,bhtk->bhst", v_BHSK, dout, **f32)
    ds_BHST = p_BHST * (dp_BHST - delta_BHT[:, :, None])  # d(true logits)
    dk = jnp.einsum("bhst,bhtk->bhsk", ds_BHST, q, **f32)
    # dq transposed, [B, H, K, T]: the product then runs along ds's rows (T contiguous). As
    # [B, H, T, K] it took as long as the rest of forward and backward together.
    return dq_BHKT + jnp.einsum("bhsk,bhst->bhkt", k_BHSK, ds_BHST, **f32), (dk, dv)

  B, H, T, K = q.shape
  dq_BHKT, (dk, dv) = jax.lax.scan(one, jnp.zeros((B, H, K, T), jnp.float32), (keys, values))
  # The true logits are q k^T / sqrt(K): dq = ds k / sqrt(K); q above carries
  # log2(e) / sqrt(K), so dk = ds^T q / log2(e).
  S = k_BSHK.shape[1]
  dq_BTHK = dq_BHKT.transpose(0, 3, 1, 2) / math.sqrt(K)
  return (dq_BTHK.astype(q_BTHK.dtype), (_unchunk(dk, S) / _LOG2E).astype(k_BSHK.dtype),
          _unchunk(dv, S).astype(v_BSHK.dtype))


chunked_attention.defvjp(lambda q, k, v, chunk: _chunked_forward(q, k, v, TRAINING_CHUNK),
                         _chunked_backward)


def splash_attention(q_BTHK, k_BSHK, v_BSHK, *, interpret: bool | None = None):
  """Self-attention through JAX's Pallas splash kernel (TPU; `interpret` runs it anywhere).

  The kernel takes one sequence and [H, T, K]; it is vmapped over the batch. Its block sizes
  must divide T, so T is padded to a multiple of 128 with keys masked out by a segment id.
  Over a mesh of several devices it runs in `shard_map`, split over the target's batch axes
  (replicated where the batch does not divide).
  """
  t = target()
  if interpret is None:  # Pallas' interpreter off TPUs: slow, for tests
    interpret = t.platform != "tpu"
  attend = functools.partial(_splash_local, interpret=interpret)
  if t.batch_shards == 1:
    return attend(q_BTHK, k_BSHK, v_BSHK)
  spec = P(t.batch_axes) if q_BTHK.shape[0] % t.batch_shards == 0 else P()
  # check_vma=False: the kernel's outputs carry no varying-axes annotation for shard_map to check
  return jax.shard_map(attend, mesh=t.mesh, in_specs=spec, out_specs=spec,
                       check_vma=False)(q_BTHK, k_BSHK, v_BSHK)


def _splash_local(q_BTHK, k_BSHK, v_BSHK, *, interpret: bool):
  """`splash_attention` on one device's examples."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as kernel, splash_attention_mask as masks)
  B, T, H, K = q_BTHK.shape
  S = k_BSHK.shape[1]
  block = 128
  Tp, Sp = T + (-T % block), S + (-S % block)
  mask = masks.MultiHeadMask([masks.FullMask((Tp, Sp)) for _ in range(H)])
  sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  splash = kernel.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                  interpret=interpret)
  scale = 1.0 / math.sqrt(K)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  q = pad((q_BTHK.astype(jnp.float32) * scale).astype(q_BTHK.dtype), Tp).transpose(0, 2, 1, 3)
  k = pad(k_BSHK, Sp).transpose(0, 2, 1, 3)
  v = pad(v_BSHK, Sp).transpose(0, 2, 1, 3)
  segments = kernel.SegmentIds(q=(jnp.arange(Tp) >= T).astype(jnp.int32),
                               kv=(jnp.arange(Sp) >= S).astype(jnp.int32))
  out = jax.vmap(lambda q, k, v: splash(q, k, v, segment_ids=segments))(q, k, v)
  return out.transpose(0, 2, 1, 3)[:, :T].astype(q_BTHK.dtype)
