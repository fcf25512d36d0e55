"""The adapter train step and the sampling program compiled for a TPU topology (v5e:2x2, four
chips) on this CPU-only host by libtpu's compiler: the attention kernel follows the target (the
Pallas splash kernel, partitioned by hand), also in a plain `jax.jit` of the UNet, the
collectives are the mesh's, and the compiler's per-chip memory figures read back and add up."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ipadapter_jax.configs import sd15_ip_adapter
from ipadapter_jax.models import attention_kernels as kernels
from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.train import compile_only
from tests import torch_reference as ref

TOPOLOGY = "v5e:2x2"
# SD1.5-like and small, with 32x32 latents: the first level's self-attention has 1,024 tokens,
# long enough for the blocked kernel (attention_kernels.LONG).
LATENT = 32
ADAPTER = AdapterConfig(num_tokens=4, embed_dim=ref.VISION_LIKE["projection_dim"])

pytestmark = pytest.mark.xdist_group("tpu_compile")


@functools.cache  # one topology query to libtpu per mesh
def _mesh(fsdp: int = 1):
  try:
    return compile_only.tpu_mesh(TOPOLOGY, fsdp)
  except RuntimeError as e:  # libtpu missing: a failure that says so, never a skip
    pytest.fail(str(e))


@pytest.fixture(scope="module")
def unet():
  return compile_only.abstract_unet(dict(ref.SD15_LIKE, sample_size=LATENT), ADAPTER)


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
  # This host is a CPU, but no mesh names the devices: the choice is left to lowering.
  assert kernels.choose(None, q, k, has_bias=False) == {
    "cpu": "chunked",
    "tpu": "splash",
    "default": "xla",
  }
  with jax.set_mesh(_mesh()):
    assert kernels.known_platform(q) == "tpu"
    assert kernels.choose(None, q, k, has_bias=False) == {"default": "splash"}
    with pytest.raises(ValueError, match="needs an NVIDIA GPU; this program is compiled for tpu"):
      kernels.choose("cudnn", q, k, has_bias=False)
  assert kernels.known_platform(q) is None  # the mesh is left


# Each of the UNet's five 1,024-token self-attention layers (two down, three up) is one call.
FORWARD_MOSAIC_CALLS = 5


def _unet_forward(devices, sharded: bool):
  """A plain `jax.jit` of the UNet's forward (no project code around it) and its abstract
  arguments: replicated weights and a batch split over `devices`, the arguments carrying
  these shardings when `sharded`, else given them by `in_shardings` only."""
  unet = compile_only.abstract_unet(dict(ref.SD15_LIKE, sample_size=LATENT), None)
  graphdef, state = nnx.split(unet)
  mesh = jax.make_mesh(
    (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )
  split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  shapes = (
    state,
    jax.ShapeDtypeStruct((8, LATENT, LATENT, 4), jnp.bfloat16),
    jax.ShapeDtypeStruct((8, 77, ref.SD15_LIKE["cross_attention_dim"]), jnp.bfloat16),
  )
  shardings = (jax.tree.map(lambda _: replicated, state), split, split)
  place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if sharded else None)
  args = jax.tree.map(place, shapes, shardings)
  forward = jax.jit(
    lambda state, x, context: nnx.merge(graphdef, state)(x, 500, context), in_shardings=shardings
  )
  return mesh, forward, args


def test_a_plain_jit_over_sharded_arguments_compiles_splash_in_shard_map():
  """No mesh in context: the arguments' shardings name the TPU mesh, which picks splash and
  splits it over the batch (XLA refuses to partition a Mosaic kernel)."""
  _, forward, args = _unet_forward(list(_mesh().devices.flat), sharded=True)
  text = forward.lower(*args).compile().as_text()
  assert text.count(compile_only.MOSAIC_CALL) == FORWARD_MOSAIC_CALLS


def test_a_plain_jit_under_set_mesh_compiles_splash_in_shard_map():
  """Arguments without shardings (in_shardings only): the mesh set by `jax.set_mesh` does it."""
  mesh, forward, args = _unet_forward(list(_mesh().devices.flat), sharded=False)
  with jax.set_mesh(mesh):
    text = forward.lower(*args).compile().as_text()
  assert text.count(compile_only.MOSAIC_CALL) == FORWARD_MOSAIC_CALLS


def test_a_plain_jit_for_one_tpu_chip_stages_the_choice_and_lowering_keeps_splash():
  """Nothing names the platform when traced (one chip, no mesh on the arguments or in
  context): every platform's kernel is staged and lowering for the TPU keeps splash."""
  _, forward, args = _unet_forward(list(_mesh().devices.flat)[:1], sharded=False)
  traced = forward.trace(*args)
  assert "platform_index" in str(traced.jaxpr)
  assert traced.lower().compile().as_text().count(compile_only.MOSAIC_CALL) == FORWARD_MOSAIC_CALLS


def test_train_step_compiles_for_tpu_with_splash_and_data_parallel_collectives(unet):
  mesh = _mesh()
  compiled = compile_only.compile_train_step(
    unet, mesh, _config(), batch_size=8, latent_size=LATENT
  )
  r = compile_only.report(compiled)
  print(r)
  assert r["mosaic_kernels"] >= 1  # the splash kernel, inside shard_map
  # Data parallel, weights replicated: nothing is gathered; the adapter's gradient is
  # all-reduced, every parameter once, with the loss (a few scalars at most).
  assert "all-gather" not in r["collectives"] and "reduce-scatter" not in r["collectives"]
  parameters, adapter_bytes = compile_only.adapter_size(unet)
  assert parameters <= r["collectives"]["all-reduce"]["elements"] <= parameters + 8
  # Per chip the arguments are the whole replicated state (frozen bf16 UNet, the float32
  # adapter with Adam's two moments), the step and the key, plus a quarter of the batch.
  frozen = _bytes(nnx.state(unet, nnx.All(nnx.Param, nnx.Not(AdapterParam))))
  batch, empty = compile_only.cached_batch(unet, 8, LATENT)
  expected = frozen + 3 * adapter_bytes + _bytes(batch) // 4 + _bytes(empty)
  # TPU layouts pad arrays to (8, 128) tiles: this tiny model's 32-wide weights take up to 4x.
  assert expected <= r["memory"]["argument"] <= 4 * expected, (r["memory"], expected)
  # The train state is donated: its output buffers are the input's.
  assert r["memory"]["alias"] >= 3 * adapter_bytes
  assert r["memory"]["temp"] > 0 and r["flops"] > 0


def test_fsdp_gathers_the_frozen_weights_it_shards(unet):
  compiled = compile_only.compile_train_step(
    unet, _mesh(fsdp=2), _config(fsdp=2), batch_size=8, latent_size=LATENT
  )
  r = compile_only.report(compiled)
  assert r["mosaic_kernels"] >= 1
  assert r["collectives"]["all-gather"]["count"] >= 1


def test_sampling_program_compiles_for_tpu_with_splash():
  networks = compile_only.abstract_networks(
    compile_only.abstract_unet(dict(ref.SD15_LIKE, sample_size=LATENT), ADAPTER),
    dict(ref.VAE_LIKE),
    dict(ref.TEXT_LIKE),
    dict(ref.VISION_LIKE),
  )
  plan, inputs = compile_only.sampling_request(networks, num_samples=4, size=2 * LATENT, steps=3)
  compiled = compile_only.compile_sampling(
    networks, compile_only.data_mesh(_mesh().devices.flat), plan, inputs
  )
  r = compile_only.report(compiled)
  print(r)
  assert r["mosaic_kernels"] >= 1
  # The weights are replicated: every chip holds all of them.
  assert r["memory"]["argument"] >= _bytes(nnx.state(networks))


def test_blocked_attention_flops_count_the_long_self_attention_layers():
  """Counted by hand from the architectures: SD1.5 at 64x64 latents has 5 transformer blocks at
  4,096 tokens (320 channels) and 5 at 1,024 (640); SDXL at 128x128 has 10 at 4,096 (640) and
  60 at 1,024 (1,280: 2 x 10 down, 3 x 10 up, 10 in the mid block)."""
  from ipadapter_jax.models.released import SD15_UNET, SDXL_UNET

  sd15 = compile_only.abstract_unet(SD15_UNET, None)
  assert compile_only.blocked_attention_flops(sd15, 64, 2) == 2 * 4 * (
    5 * 4096**2 * 320 + 5 * 1024**2 * 640
  )
  sdxl = compile_only.abstract_unet(SDXL_UNET, None)
  assert compile_only.blocked_attention_flops(sdxl, 128, 1) == 4 * (
    10 * 4096**2 * 640 + 60 * 1024**2 * 1280
  )
  assert compile_only.blocked_attention_flops(sd15, 16, 1) == 0  # 256 tokens at most: XLA's einsums


def test_matmul_flops_counts_products_convolutions_and_loops():
  """Hand counts: 2 x output elements x contracted size for each product and convolution."""
  conv = lambda img, kernel, stride, groups=1: jax.lax.conv_general_dilated(
    img,
    kernel,
    (stride, stride),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )

  def program(x, w, img):
    y = jax.jit(lambda x, w: x @ w)(x, w)  # 2 x (4 x 16) x 8
    strided = conv(img, jnp.ones((3, 3, 3, 5)), 2)  # 2 x (2 x 5 x 5 x 5) x (3 x 3 x 3)
    depthwise = conv(img, jnp.ones((3, 3, 1, 3)), 1, 3)  # 2 x (2 x 10 x 10 x 3) x (3 x 3 x 1)
    y, _ = jax.lax.scan(lambda c, _: (c @ jnp.ones((16, 16)), None), y, length=3)  # 3 x 2 x 64 x 16
    batched = jnp.einsum("bij,bjk->bik", jnp.ones((5, 4, 6)), jnp.ones((5, 6, 7)))  # 2 x 140 x 6
    return y, strided, depthwise, batched

  jaxpr = jax.make_jaxpr(program)(jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((2, 10, 10, 3)))
  assert compile_only.matmul_flops(jaxpr) == (
    2 * 64 * 8 + 2 * 250 * 27 + 2 * 600 * 9 + 3 * 2 * 64 * 16 + 2 * 140 * 6
  )
  # shard_map: the body sees one device's [2, 8] rows of [8, 8]; the four devices do the whole.
  mesh = jax.sharding.AbstractMesh((4, 1), ("data", "fsdp"))
  sharded = jax.shard_map(
    lambda x: x @ jnp.ones((8, 16)), mesh=mesh, in_specs=P("data"), out_specs=P("data")
  )
  assert compile_only.matmul_flops(jax.make_jaxpr(sharded)(jnp.ones((8, 8)))) == 2 * 8 * 16 * 8


def test_matmul_flops_of_the_train_step_against_xla():
  """The adapter train step with XLA's attention, compiled for this CPU: XLA's FLOP count is
  the products and convolutions counted from the traced program plus the elementwise work
  (norms, activations, softmax, AdamW), a few percent here."""
  from ipadapter_jax.train import sharding

  unet = compile_only.abstract_unet(
    dict(ref.SD15_LIKE, sample_size=16), ADAPTER, attention_implementation="xla"
  )
  mesh = sharding.make_mesh(-1, 1, devices=jax.devices("cpu")[:1])
  step, args = compile_only.train_step(unet, mesh, _config(), batch_size=2, latent_size=16)
  counted = compile_only.matmul_flops(jax.make_jaxpr(step)(*args))
  xla = compile_only.report(step.lower(*args).compile())["flops"]
  print(
    f"train step: XLA {xla:.4g} FLOPs, products and convolutions {counted:.4g}: "
    f"ratio {xla / counted:.3f}"
  )
  assert counted <= xla <= 1.15 * counted  # 1.064 measured
