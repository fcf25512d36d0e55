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

`choose` picks one when none is asked for: splash on TPUs and chunked on CPUs for
self-attention of at least `LONG` tokens, cuDNN for bf16/fp16 on NVIDIA GPUs, XLA otherwise
(cross-attention over 77 + N tokens is small: a plain einsum). docs/performance.md has the
measurements.

The platform is that of the devices the program is compiled for, not the host's. Where tracing
knows them, from the mesh set by `jax.set_mesh` or the one the inputs are sharded over (their
type carries it, also in a plain `jax.jit`), the kernel is chosen then; otherwise `attention`
stages each platform's kernel with `jax.lax.platform_dependent` and lowering keeps the target's.
Either way a TPU program compiled on a CPU host (benchmarks/tpu_compile.py) holds the splash
kernel. Staging is the fallback only: differentiated, a staged choice carries every kernel's
residuals, which over a TPU mesh with remat="dots" took a quarter more temporary memory
(docs/performance.md). A Pallas kernel cannot be partitioned by XLA, so over several devices
splash runs inside `shard_map` over the batch (`_batch_axes`), each device on its own examples.
"""

from __future__ import annotations

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


@functools.cache
def _has_cuda() -> bool:
  """Whether this process can trace cuDNN attention: jax.nn's needs a loaded CUDA backend."""
  try:
    return bool(jax.devices("cuda"))
  except RuntimeError:  # "Unknown backend cuda"
    return False


def _mesh(x) -> jax.sharding.AbstractMesh:
  """The mesh set by `jax.set_mesh`, else the one `x` is sharded over (empty if neither)."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.typeof(x).sharding.mesh if mesh.empty else mesh


def known_platform(x) -> str | None:
  """The platform ("cpu", "tpu", "cuda", "rocm") of the devices `x`'s program is compiled for,
  where its mesh names them; None where only lowering will tell."""
  device = _mesh(x).abstract_device
  if device is None:
    return None
  if device.platform == "gpu":  # NVIDIA's and AMD's alike
    return "cuda" if _has_cuda() else "rocm"
  return device.platform


def choose(implementation: str | None, q_BTHK, k_BSHK, *, has_bias: bool) -> dict[str, str]:
  """The kernel of one attention call per platform ("default": any other), one kernel under
  "default" alone where the platform is known when traced (`known_platform`); refuses an
  impossible explicit choice in one line.

  The blocked kernels ("chunked", "splash") only ever take long self-attention, asked for or
  not: everything shorter (cross-attention over 77 + N tokens, low-resolution levels) is a
  plain XLA einsum.
  """
  platform = known_platform(q_BTHK)
  half = q_BTHK.dtype in (jnp.bfloat16, jnp.float16)
  head_dim = q_BTHK.shape[-1]
  blocked = (q_BTHK.shape[1] == k_BSHK.shape[1] >= LONG) and not has_bias
  if implementation is None:
    per_platform = {"cpu": "chunked" if blocked else "xla", "tpu": "splash" if blocked else "xla"}
    # Without a CUDA backend no program of this process is compiled for CUDA (and jax.nn
    # could not trace cuDNN's attention).
    if _has_cuda() and half and head_dim % 8 == 0 and head_dim <= 128:
      per_platform["cuda"] = "cudnn"
    if platform is not None:
      return {"default": per_platform.get(platform, "xla")}
    return {p: k for p, k in per_platform.items() if k != "xla"} | {"default": "xla"}
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation {implementation!r} is not one of "
      f"{', '.join(IMPLEMENTATIONS)} (or None: chosen per platform)"
    )
  if implementation == "cudnn":
    # Where neither the mesh nor this process rules it out, lowering for another platform
    # fails in cuDNN's own lowering.
    if platform not in (None, "cuda") or not _has_cuda():
      where = (
        f"this program is compiled for {platform}"
        if platform
        else "this process has no CUDA backend"
      )
      raise ValueError(
        f"cuDNN attention needs an NVIDIA GPU; {where} (leave "
        "attention_implementation unset to choose per platform)"
      )
    if not half:
      raise ValueError(
        f"cuDNN attention needs bfloat16 or float16 inputs, got {q_BTHK.dtype} "
        "(run the model with dtype=jnp.bfloat16, or use 'xla')"
      )
  if implementation in ("chunked", "splash") and not blocked:
    return {"default": "xla"}
  return {"default": implementation}


def attention(q_BTHK, k_BSHK, v_BSHK, implementation: str | None = None, bias=None):
  """softmax(q k^T / sqrt(K) + bias) v by the kernel `choose` gives the program's platform."""
  choice = choose(implementation, q_BTHK, k_BSHK, has_bias=bias is not None)
  branches = {platform: _kernel(name, platform, bias) for platform, name in choice.items()}
  default = branches.pop("default")
  if not branches:
    return default(q_BTHK, k_BSHK, v_BSHK)
  return jax.lax.platform_dependent(q_BTHK, k_BSHK, v_BSHK, default=default, **branches)


def _kernel(name: str, platform: str, bias):
  """The kernel `name` as a function of (q, k, v)."""
  if name == "chunked":
    return lambda q, k, v: chunked_attention(q, k, v)
  if name == "splash":  # the TPU branch is only lowered for TPUs: no interpreter to stage
    return functools.partial(splash_attention, interpret=False if platform == "tpu" else None)
  if name == "cudnn":
    return functools.partial(cudnn_attention, bias=bias)
  return functools.partial(xla_attention, bias=bias)


def cudnn_attention(q_BTHK, k_BSHK, v_BSHK, bias=None):
  """`jax.nn.dot_product_attention` by cuDNN (NVIDIA GPUs, bfloat16/float16)."""
  if bias is not None:  # cuDNN takes the bias in the inputs' dtype, the query axis spelled out
    bias = jnp.asarray(bias, q_BTHK.dtype)
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_BTHK.shape[1], k_BSHK.shape[1]))
  return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, bias=bias, implementation="cudnn")


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
  out = (
    jnp.einsum(
      "bhqs,bhsk->bhqk", p.astype(v_BHSK.dtype), v_BHSK, preferred_element_type=jnp.float32
    )
    / total
  )  # normalised after the product
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
  return (
    dq_BTHK.astype(q_BTHK.dtype),
    (_unchunk(dk, S) / _LOG2E).astype(k_BSHK.dtype),
    _unchunk(dv, S).astype(v_BSHK.dtype),
  )


chunked_attention.defvjp(
  lambda q, k, v, chunk: _chunked_forward(q, k, v, TRAINING_CHUNK), _chunked_backward
)


def splash_attention(q_BTHK, k_BSHK, v_BSHK, *, interpret: bool | None = None):
  """Self-attention through JAX's Pallas splash kernel (TPU; `interpret` runs it anywhere).

  The kernel takes one sequence and [H, T, K]; it is vmapped over the batch. Its block sizes
  must divide T, so T is padded to a multiple of 128 with keys masked out by a segment id.
  `interpret` None: compiled for TPUs, Pallas' interpreter elsewhere (slow, for tests). Over
  several devices it runs in `shard_map` (`_batch_axes`).
  """
  if interpret is None and (platform := known_platform(q_BTHK)) is not None:
    interpret = platform != "tpu"
  if interpret is None:
    attend = lambda q, k, v: jax.lax.platform_dependent(
      q,
      k,
      v,
      tpu=functools.partial(_splash_local, interpret=False),
      default=functools.partial(_splash_local, interpret=True),
    )
  else:
    attend = functools.partial(_splash_local, interpret=interpret)
  mesh, axes = _batch_axes(q_BTHK)
  shards = math.prod(mesh.shape[a] for a in axes)
  if shards == 1:
    return attend(q_BTHK, k_BSHK, v_BSHK)
  spec = P(axes) if q_BTHK.shape[0] % shards == 0 else P()
  # check_vma=False: the kernel's outputs carry no varying-axes annotation for shard_map to check
  return jax.shard_map(attend, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(
    q_BTHK, k_BSHK, v_BSHK
  )


def _batch_axes(x_BTHK) -> tuple[jax.sharding.AbstractMesh, tuple[str, ...]]:
  """The mesh (`_mesh`) and the axes splash splits the batch over: all not already manual."""
  # shard_map, not custom_partitioning: that has no autodiff rule, so it would need splash's
  # forward and backward apart, which only the kernel's private functions give; the mesh in
  # the inputs' type already serves a plain jit over sharded arguments. Every axis: the
  # package's meshes split the batch over all of theirs.
  mesh = _mesh(x_BTHK)
  return mesh, tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)


def _splash_local(q_BTHK, k_BSHK, v_BSHK, *, interpret: bool):
  """`splash_attention` on one device's examples."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  B, T, H, K = q_BTHK.shape
  S = k_BSHK.shape[1]
  block = 128
  Tp, Sp = T + (-T % block), S + (-S % block)
  mask = masks.MultiHeadMask([masks.FullMask((Tp, Sp)) for _ in range(H)])
  sizes = kernel.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  splash = kernel.make_splash_mha(
    mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
  )
  scale = 1.0 / math.sqrt(K)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  q = pad((q_BTHK.astype(jnp.float32) * scale).astype(q_BTHK.dtype), Tp).transpose(0, 2, 1, 3)
  k = pad(k_BSHK, Sp).transpose(0, 2, 1, 3)
  v = pad(v_BSHK, Sp).transpose(0, 2, 1, 3)
  segments = kernel.SegmentIds(
    q=(jnp.arange(Tp) >= T).astype(jnp.int32), kv=(jnp.arange(Sp) >= S).astype(jnp.int32)
  )
  out = jax.vmap(lambda q, k, v: splash(q, k, v, segment_ids=segments))(q, k, v)
  return out.transpose(0, 2, 1, 3)[:, :T].astype(q_BTHK.dtype)
