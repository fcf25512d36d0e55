"""The attention kernels: chunked (with its recomputing backward) and splash (Pallas, interpreted
here) against XLA's attention, the per-platform choice, and a whole UNet on the chunked path
against diffusers."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ipadapter_jax.models import attention_kernels as kernels
from ipadapter_jax.models.attention import dot_product_attention
from ipadapter_jax.weights import load_unet
from tests import torch_reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(T, S, H=3, K=8, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((2, T, H, K), np.float32)
  k, v = (rng.standard_normal((2, S, H, K), np.float32) for _ in range(2))
  g = rng.standard_normal((2, T, H, K), np.float32)
  return [jnp.asarray(a, dtype) for a in (q, k, v, g)]


@pytest.mark.parametrize("T,chunk", [(300, 64), (256, 128), (40, 64)])
def test_chunked_attention_and_its_gradients_equal_xla(T, chunk):
  """Query counts that do and do not divide into chunks (and fewer queries than one chunk)."""
  q, k, v, g = _qkv(T, T)
  loss = lambda fn: jax.jit(
    jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * g), argnums=(0, 1, 2))
  )
  _, grads = loss(lambda q, k, v: kernels.chunked_attention(q, k, v, chunk))(q, k, v)
  _, expected = loss(kernels.xla_attention)(q, k, v)
  np.testing.assert_allclose(
    kernels.chunked_attention(q, k, v, chunk), kernels.xla_attention(q, k, v), rtol=1e-5, atol=1e-6
  )
  for name, a, b in zip("qkv", grads, expected):
    err = float(jnp.abs(a - b).max())
    print(
      f"T={T}, chunk {chunk}: d{name} max abs error {err:.1e} (scale {float(jnp.abs(b).max()):.1f})"
    )
    assert err <= 1e-5 * float(jnp.abs(b).max())


def test_chunked_backward_stores_no_full_logits():
  """The gradient program holds [B, H, chunk, S] blocks, never [B, H, T, S]."""
  q, k, v, g = _qkv(512, 512)
  f = jax.jit(jax.grad(lambda q: jnp.sum(kernels.chunked_attention(q, k, v, 64) * g)))
  text = f.lower(q).as_text()
  assert "2x3x512x512" not in text and "2x3x128x512" in text  # TRAINING_CHUNK queries


def test_chunked_attention_in_bfloat16_is_close():
  q, k, v, _ = _qkv(200, 200, dtype=jnp.bfloat16)
  out = kernels.chunked_attention(q, k, v, 64)
  assert out.dtype == jnp.bfloat16
  expected = kernels.xla_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
  assert float(jnp.abs(out.astype(jnp.float32) - expected).max()) < 2e-2  # bf16 output rounding


def test_splash_attention_equals_xla_in_interpret_mode():
  """The Pallas splash kernel (the TPU path), with sequence padding, run by Pallas' interpreter."""
  q, k, v, _ = _qkv(200, 200, H=2, K=64)
  err = float(
    jnp.abs(
      kernels.splash_attention(q, k, v, interpret=True) - kernels.xla_attention(q, k, v)
    ).max()
  )
  print(f"splash (interpret) vs XLA: max abs error {err:.1e}")
  assert err <= 1e-5


def test_the_choice_per_platform_and_the_refusals():
  """Unsharded arrays name no devices: long self-attention gets one kernel per platform, for
  lowering to pick; everything else is the same everywhere."""
  long_q, long_k, _, _ = _qkv(1024, 1024)
  short_q, short_k, _, _ = _qkv(1024, 81)
  assert kernels.known_platform(long_q) is None
  assert kernels.choose(None, long_q, long_k, has_bias=False) == {
    "cpu": "chunked",
    "tpu": "splash",
    "default": "xla",
  }
  assert kernels.choose(None, short_q, short_k, has_bias=False) == {"default": "xla"}  # cross
  assert kernels.choose(None, long_q, long_k, has_bias=True) == {"default": "xla"}
  assert kernels.choose("splash", short_q, short_k, has_bias=False) == {"default": "xla"}
  assert kernels.choose("splash", long_q, long_k, has_bias=False) == {"default": "splash"}
  with pytest.raises(ValueError, match="needs an NVIDIA GPU; this process has no CUDA"):
    kernels.choose("cudnn", long_q, long_k, has_bias=False)
  with pytest.raises(ValueError, match="is not one of"):
    kernels.choose("flash", long_q, long_k, has_bias=False)


def test_a_plain_jit_on_this_cpu_stages_the_choice_and_runs_the_chunked_kernel():
  """No mesh names the devices: the kernels are staged per platform and lowering for this CPU
  keeps the chunked one (its loop; XLA's einsums have none), outputs and gradients XLA's."""
  q, k, v, g = _qkv(1024, 1024, H=1)
  auto = jax.jit(lambda q, k, v: dot_product_attention(q, k, v))
  xla = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, "xla"))
  assert "platform_index" in str(auto.trace(q, k, v).jaxpr)
  auto_text, xla_text = (f.lower(q, k, v).compile().as_text() for f in (auto, xla))
  assert "while" in auto_text and "while" not in xla_text  # the chunk loop
  assert "conditional" not in auto_text  # one platform's kernel, not a switch
  np.testing.assert_allclose(auto(q, k, v), kernels.xla_attention(q, k, v), rtol=1e-5, atol=1e-6)
  loss = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * g), argnums=(0, 1, 2)))
  for a, b in zip(loss(dot_product_attention)(q, k, v), loss(kernels.xla_attention)(q, k, v)):
    assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_on_the_chunked_path_matches_diffusers(unet_folders, family):
  """1,024-token self-attention (32x32 at the first cross-attention level), where the CPU
  default is the chunked kernel."""
  torch_unet, folder = unet_folders[family]
  g = torch.Generator().manual_seed(0)
  size = 32 if family == "sd15" else 64  # SDXL's first level has no attention
  x = torch.randn(1, 4, size, size, generator=g)
  ctx = torch.randn(1, 7, torch_unet.config.cross_attention_dim, generator=g)
  added = None
  if torch_unet.config.addition_embed_type == "text_time":
    added = {
      "text_embeds": torch.randn(1, ref.SDXL_POOLED_DIM, generator=g),
      "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
    }
  with torch.no_grad():
    expected = torch_unet(x, 500, ctx, added_cond_kwargs=added).sample.numpy()
  kw = {} if added is None else {k: jnp.asarray(v.numpy()) for k, v in added.items()}
  model = load_unet(folder)
  actual = jax.jit(lambda x, c: model(x, 500, c, layout="NCHW", **kw))(
    jnp.asarray(x.numpy()), jnp.asarray(ctx.numpy())
  )
  err = ref.assert_close(np.asarray(actual), expected)
  print(f"{family}, {size}x{size} latents, chunked attention: max abs error {err:.2e}")


def test_asking_for_splash_runs_it_interpreted_off_tpu():
  """attention_implementation="splash" on this CPU: long self-attention goes through the Pallas
  kernel (interpreted), everything else through XLA."""
  q, k, v, _ = _qkv(1024, 1024, H=1, K=64)
  err = float(
    jnp.abs(dot_product_attention(q, k, v, "splash") - kernels.xla_attention(q, k, v)).max()
  )
  assert err <= 1e-5


SHARDED_SPLASH = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ipadapter_jax.models import attention_kernels as kernels
mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
rng = np.random.default_rng(0)
q, k, v, g = (jnp.asarray(rng.standard_normal((4, 200, 2, 64)), jnp.float32) for _ in range(4))
split = NamedSharding(mesh, P(("data", "fsdp")))
sharded = [jax.device_put(x, split) for x in (q, k, v, g)]
loss = lambda f, g: (lambda q, k, v: jnp.sum(f(q, k, v) * g))
splash = lambda q, k, v: kernels.splash_attention(q, k, v, interpret=True)
manual = lambda text: "shard_map" in text or "sdy.manual_computation" in text
out = {}
# The mesh from the arguments' shardings alone, then from jax.set_mesh with unsharded ones.
for name, f, (q_, k_, v_, g_) in (("shardings", splash, sharded),
                                  ("xla", kernels.xla_attention, sharded)):
  out[name] = jax.jit(jax.value_and_grad(loss(f, g_), argnums=(0, 1, 2)))(q_, k_, v_)
text = {"shardings": jax.jit(splash).lower(*sharded[:3]).as_text(),
        "none": jax.jit(splash).lower(q, k, v).as_text()}
with jax.set_mesh(mesh):
  # Made inside the program, these arrays carry no mesh: only the context names it.
  inside = jax.jit(lambda s: splash(*(jnp.broadcast_to(s, (4, 200, 2, 64)) for _ in range(3))))
  text["set_mesh"] = inside.lower(jnp.float32(1)).as_text()
  out["set_mesh"] = jax.jit(jax.value_and_grad(loss(splash, g), argnums=(0, 1, 2)))(q, k, v)
  # Long self-attention where the mesh names the platform: chosen when traced, nothing staged.
  long = jnp.zeros((4, 1024, 2, 8))
  staged = "platform_index" in str(jax.make_jaxpr(
      lambda q: kernels.attention(q, q, q))(long))
errs = {name: max(float(jnp.abs(a - b).max()) for a, b in
                  zip(jax.tree.leaves(out[name]), jax.tree.leaves(out["xla"])))
        for name in ("shardings", "set_mesh")}
print(json.dumps({"errs": errs, "manual": {name: manual(t) for name, t in text.items()},
                  "staged": staged}))
"""


def test_splash_over_a_mesh_runs_per_shard_and_matches_xla():
  """Over a mesh of several devices splash runs in shard_map over the batch axes (a Pallas kernel
  cannot be partitioned by XLA), whether the mesh comes from the arguments' shardings or from
  `jax.set_mesh`, and its outputs and gradients equal XLA's attention."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", SHARDED_SPLASH],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  print(out)
  assert out["manual"] == {"shardings": True, "set_mesh": True, "none": False}
  assert not out["staged"]
  for err in out["errs"].values():
    assert err <= 1e-4  # the gradients sum 4 x 200 x 128 products: float32 rounding


def _gpu_mesh():
  """An abstract mesh of NVIDIA GPUs, as a GPU program's arguments or `jax.set_mesh` name it."""
  gpu = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
  )
  return jax.sharding.AbstractMesh(
    (1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=gpu
  )


def test_the_choice_follows_the_compile_target_not_the_host(monkeypatch):
  """A program whose mesh is of GPUs takes cuDNN for bf16 (and XLA for float32) even when this
  host is a CPU; with CUDA in the process and no mesh, cuDNN is staged for CUDA alone."""
  q16, k16 = (jnp.zeros((2, 1024, 2, 64), jnp.bfloat16) for _ in range(2))
  q32, k32 = (jnp.zeros((2, 1024, 2, 64), jnp.float32) for _ in range(2))
  assert "cuda" not in kernels.choose(None, q16, k16, has_bias=False)  # no CUDA here
  monkeypatch.setattr(kernels, "_has_cuda", lambda: True)
  assert kernels.choose(None, q16, k16, has_bias=False) == {
    "cpu": "chunked",
    "tpu": "splash",
    "cuda": "cudnn",
    "default": "xla",
  }
  assert kernels.choose(None, q32, k32, has_bias=False) == {
    "cpu": "chunked",
    "tpu": "splash",
    "default": "xla",
  }
  with jax.sharding.use_abstract_mesh(_gpu_mesh()):
    assert kernels.known_platform(q16) == "cuda"
    assert kernels.choose(None, q16, k16, has_bias=False) == {"default": "cudnn"}
    assert kernels.choose(None, q32, k32, has_bias=False) == {"default": "xla"}
    assert kernels.choose("cudnn", q16, k16, has_bias=False) == {"default": "cudnn"}
    with pytest.raises(ValueError, match="needs bfloat16"):
      kernels.choose("cudnn", q32, k32, has_bias=False)
