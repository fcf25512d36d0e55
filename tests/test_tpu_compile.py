"""The adapter train step and the sampling program compiled for a TPU topology (v5e:2x2, four
chips) on this CPU-only host by libtpu's compiler: the attention kernel follows the target (the
Pallas splash kernel, partitioned by hand), the collectives are the mesh's, and the compiler's
per-chip memory figures read back and add up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ipadapter_jax.configs import sd15_ip_adapter
from ipadapter_jax.models import attention_kernels as kernels
from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.train import aot
from tests import torch_reference as ref

TOPOLOGY = "v5e:2x2"
# SD1.5-like and small, with 32x32 latents: the first level's self-attention has 1,024 tokens,
# long enough for the blocked kernel (attention_kernels.LONG).
LATENT = 32
ADAPTER = AdapterConfig(num_tokens=4, embed_dim=ref.VISION_LIKE["projection_dim"])

pytestmark = pytest.mark.xdist_group("tpu_compile")


def _mesh(fsdp: int = 1):
  try:
    return aot.tpu_mesh(TOPOLOGY, fsdp)
  except RuntimeError as e:  # libtpu missing: a failure that says so, never a skip
    pytest.fail(str(e))


@pytest.fixture(scope="module")
def unet():
  return aot.abstract_unet(dict(ref.SD15_LIKE, sample_size=LATENT), ADAPTER)


def _config(fsdp: int = 1):
  """The SD1.5 recipe's run config, its weights sharded over fsdp when there is one."""
  cfg = sd15_ip_adapter.get_config()
  cfg.mesh.fsdp = fsdp
  cfg.mesh.shard_frozen = cfg.mesh.shard_trainable = fsdp > 1
  return cfg


def _bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def test_the_kernel_follows_the_mesh_not_the_host():
  q = k = jnp.zeros((8, 1024, 2, 16), jnp.bfloat16)
  assert kernels.choose(None, q, k, has_bias=False) == "chunked"  # this host: a CPU
  mesh = _mesh()
  with kernels.compiling_for(mesh):
    assert kernels.target().platform == "tpu" and kernels.target().batch_shards == 4
    assert kernels.choose(None, q, k, has_bias=False) == "splash"
  assert kernels.choose(None, q, k, has_bias=False) == "chunked"  # the context is left


def test_train_step_compiles_for_tpu_with_splash_and_data_parallel_collectives(unet):
  mesh = _mesh()
  compiled = aot.compile_train_step(unet, mesh, _config(), batch_size=8, latent_size=LATENT)
  r = aot.report(compiled)
  print(r)
  assert r["mosaic_kernels"] >= 1  # the splash kernel, inside shard_map
  # Data parallel, weights replicated: nothing is gathered; the adapter's gradient is
  # all-reduced, every parameter once, with the loss (a few scalars at most).
  assert "all-gather" not in r["collectives"] and "reduce-scatter" not in r["collectives"]
  parameters, adapter_bytes = aot.adapter_size(unet)
  assert parameters <= r["collectives"]["all-reduce"]["elements"] <= parameters + 8
  # Per chip the arguments are the whole replicated state (frozen bf16 UNet, the float32
  # adapter with Adam's two moments), the step and the key, plus a quarter of the batch.
  frozen = _bytes(nnx.state(unet, nnx.All(nnx.Param, nnx.Not(AdapterParam))))
  batch, empty = aot.cached_batch(unet, 8, LATENT)
  expected = frozen + 3 * adapter_bytes + _bytes(batch) // 4 + _bytes(empty)
  # TPU layouts pad arrays to (8, 128) tiles: this tiny model's 32-wide weights take up to 4x.
  assert expected <= r["memory"]["argument"] <= 4 * expected, (r["memory"], expected)
  # The train state is donated: its output buffers are the input's.
  assert r["memory"]["alias"] >= 3 * adapter_bytes
  assert r["memory"]["temp"] > 0 and r["flops"] > 0


def test_fsdp_gathers_the_frozen_weights_it_shards(unet):
  compiled = aot.compile_train_step(unet, _mesh(fsdp=2), _config(fsdp=2), batch_size=8,
                                    latent_size=LATENT)
  r = aot.report(compiled)
  assert r["mosaic_kernels"] >= 1
  assert r["collectives"]["all-gather"]["count"] >= 1


def test_sampling_program_compiles_for_tpu_with_splash():
  networks = aot.abstract_networks(
      aot.abstract_unet(dict(ref.SD15_LIKE, sample_size=LATENT), ADAPTER),
      dict(ref.VAE_LIKE), dict(ref.TEXT_LIKE), dict(ref.VISION_LIKE))
  plan, inputs = aot.sampling_request(networks, num_samples=4, size=2 * LATENT, steps=3)
  compiled = aot.compile_sampling(networks, aot.data_mesh(_mesh().devices.flat), plan, inputs)
  r = aot.report(compiled)
  print(r)
  assert r["mosaic_kernels"] >= 1
  # The weights are replicated: every chip holds all of them.
  assert r["memory"]["argument"] >= _bytes(nnx.state(networks))


def test_blocked_attention_flops_count_the_long_self_attention_layers():
  """Counted by hand from the architectures: SD1.5 at 64x64 latents has 5 transformer blocks at
  4,096 tokens (320 channels) and 5 at 1,024 (640); SDXL at 128x128 has 10 at 4,096 (640) and
  60 at 1,024 (1,280: 2 x 10 down, 3 x 10 up, 10 in the mid block)."""
  from ipadapter_jax.models.released import SD15_UNET, SDXL_UNET
  sd15 = aot.abstract_unet(SD15_UNET, None)
  assert aot.blocked_attention_flops(sd15, 64, 2) == 2 * 4 * (5 * 4096 ** 2 * 320
                                                              + 5 * 1024 ** 2 * 640)
  sdxl = aot.abstract_unet(SDXL_UNET, None)
  assert aot.blocked_attention_flops(sdxl, 128, 1) == 4 * (10 * 4096 ** 2 * 640
                                                           + 60 * 1024 ** 2 * 1280)
  assert aot.blocked_attention_flops(sd15, 16, 1) == 0  # 256 tokens at most: XLA's einsums
