"""Compile-only checks of the programs a run executes, for devices this host does not have.

libtpu's compiler runs on any host: `tpu_mesh("v5e:2x2")` is the run's (data, fsdp) mesh over a
TPU topology's devices, and `compile_train_step` / `compile_sampling` compile the adapter train
step (as `train/program.py` builds it for the loop) and the sampling program (`pipeline.generate`)
for it from abstract models (`nnx.eval_shape`: no weights, no device memory). `report` reads
back what the compiler says: memory per device, FLOPs, bytes accessed, the collectives and the
Mosaic (Pallas) kernels in the program.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ipadapter_jax.diffusion.samplers import DDIM
from ipadapter_jax.diffusion.schedule import STABLE_DIFFUSION
from ipadapter_jax.generation.image_prompts import AdapterInputs, AdapterPlan
from ipadapter_jax.generation.pipeline import generate, latents_sharding
from ipadapter_jax.generation.request import Inputs, Plan
from ipadapter_jax.models.attention_kernels import LONG
from ipadapter_jax.models.clip import (
  CLIPTextConfig,
  CLIPTextModel,
  CLIPVisionConfig,
  CLIPVisionModelWithProjection,
)
from ipadapter_jax.models.image_proj import AdapterConfig
from ipadapter_jax.models.layers import AdapterParam
from ipadapter_jax.models.networks import Networks
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig
from ipadapter_jax.train import sharding
from ipadapter_jax.train.loading import denoising_spec
from ipadapter_jax.train.program import program_from_config

# The Mosaic custom call a compiled Pallas TPU kernel becomes.
MOSAIC_CALL = 'custom_call_target="tpu_custom_call"'
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# TPU generations whose topologies expose both TensorCores of a chip as one device.
_MEGACORE = ("v4", "v5p")


def tpu_devices(topology: str, chips_per_host: tuple[int, int, int] | None = None) -> list:
  """The compile-only devices of a TPU topology such as "v5e:2x4" or "v4:2x2x1" (libtpu)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  kw: dict[str, Any] = {}
  if topology.split(":")[0] in _MEGACORE:
    kw["chip_config_name"] = "megacore"
  if chips_per_host is not None:
    kw["chips_per_host_bounds"] = chips_per_host
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw).devices)
  except (RuntimeError, ValueError) as e:  # no libtpu, or a name it does not know
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise RuntimeError(
      f"cannot compile for TPU topology {topology!r} ({first}); the TPU "
      "compiler comes with libtpu: pip install -e '.[tpu]'"
    ) from None


def tpu_mesh(topology: str, fsdp: int = 1, chips_per_host=None) -> jax.sharding.Mesh:
  """The run's (data, fsdp) mesh over a TPU topology's devices."""
  return sharding.make_mesh(-1, fsdp, devices=tpu_devices(topology, chips_per_host))


def abstract(build):
  """A model built by shape only (no weights)."""
  return nnx.eval_shape(build)


def abstract_unet(
  raw_config: dict,
  adapter: AdapterConfig | None,
  *,
  dtype=jnp.bfloat16,
  param_dtype=jnp.bfloat16,
  remat: str = "none",
  attention_implementation: str | None = None,
) -> UNet2DConditionModel:
  """A UNet (with its adapter) by shape, from a diffusers unet/config.json."""
  unet = abstract(
    lambda: UNet2DConditionModel(
      UNetConfig.from_diffusers(raw_config),
      adapter=adapter,
      dtype=dtype,
      param_dtype=param_dtype,
      attention_implementation=attention_implementation,
      rngs=nnx.Rngs(0),
    )
  )
  unet.remat = remat
  return unet


def cached_batch(unet, batch_size: int, latent_size: int, text_tokens: int = 77):
  """(batch, empty) as ShapeDtypeStructs: what an embedding-cache batch holds (data.cache)."""
  cfg = unet.config
  f32, context_dim = jnp.float32, cfg.cross_attention_dim[0]
  embed = unet.adapter_config.embed_dim
  latents = jax.ShapeDtypeStruct((batch_size, latent_size, latent_size, cfg.in_channels), f32)
  batch = {
    "text_context": jax.ShapeDtypeStruct((batch_size, text_tokens, context_dim), f32),
    "image_embeds": jax.ShapeDtypeStruct((batch_size, embed), f32),
    "latent_mean": latents,
    "latent_logvar": latents,
  }
  empty = {
    "text_context": jax.ShapeDtypeStruct((1, text_tokens, context_dim), f32),
    "image_features": jax.ShapeDtypeStruct((embed,), f32),
  }
  if cfg.addition_embed_type == "text_time":  # SDXL: pooled text and size conditioning
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    batch["text_pooled"] = jax.ShapeDtypeStruct((batch_size, pooled), f32)
    batch["time_ids"] = jax.ShapeDtypeStruct((batch_size, 6), f32)
    empty["text_pooled"] = jax.ShapeDtypeStruct((1, pooled), f32)
  return batch, empty


def train_step(
  unet,
  mesh,
  cfg,
  *,
  batch_size: int,
  latent_size: int,
  optimizer: optax.GradientTransformation | None = None,
):
  """(step, abstract arguments): the adapter train step of a run with config `cfg` on `mesh`,
  built as the loop builds it (`program_from_config`: the configured optimizer, the
  trainable/frozen split, the mesh's shardings, donation), for a global batch of cached encoder
  outputs."""
  spec = denoising_spec(cfg, STABLE_DIFFUSION, unet.adapter_config, VAEConfig(), cached=True)
  program, params, frozen = program_from_config(
    cfg, Networks(unet=unet), spec, mesh, optimizer=optimizer
  )
  state = jax.eval_shape(program.init_state, params)
  batch, empty = cached_batch(unet, batch_size, latent_size)
  key = jax.eval_shape(lambda: jax.random.key(0))
  placed = [
    (state, program.state_shardings),
    (frozen, program.frozen_shardings),
    (batch, sharding.batch_sharding(mesh)),
    (empty, program.replicated),
    (key, program.replicated),
  ]
  args = tuple(sharding.abstract(tree, shardings) for tree, shardings in placed)
  return program.step(batch), args


def compile_train_step(
  unet,
  mesh,
  cfg,
  *,
  batch_size: int,
  latent_size: int,
  optimizer: optax.GradientTransformation | None = None,
):
  """The compiled `train_step`."""
  step, args = train_step(
    unet, mesh, cfg, batch_size=batch_size, latent_size=latent_size, optimizer=optimizer
  )
  return step.lower(*args).compile()


def matmul_flops(jaxpr) -> int:
  """The FLOPs of every matrix product and convolution in a traced program, from their shapes:
  2 x output elements x contracted size (for a convolution, the kernel window times its input
  channels per group). A scan's body counts `length` times, a while loop's body once (its trip
  count is not known when traced, and XLA's count does the same), a `cond` its largest branch,
  a `shard_map` its body once per device.
  This is the program's arithmetic as written, independent of the compiler's cost model, which
  also counts elementwise work and leaves out Mosaic kernels."""
  total = 0
  for eqn in jaxpr.eqns:
    name, params = eqn.primitive.name, eqn.params
    if name == "pallas_call":
      raise ValueError(
        "cannot count the FLOPs inside a Pallas kernel: trace the program with "
        "attention_implementation='xla'"
      )
    out = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if name == "dot_general":
      (contract, _), _ = params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(out)) * int(np.prod([lhs[d] for d in contract]))
    elif name == "conv_general_dilated":
      rhs, spec = eqn.invars[1].aval.shape, params["dimension_numbers"].rhs_spec
      window = int(np.prod([rhs[d] for d in spec[2:]])) * rhs[spec[1]]
      total += 2 * int(np.prod(out)) * window
    elif name == "cond":
      total += max(matmul_flops(branch) for branch in params["branches"])
    else:
      inner = [v for v in params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
      count = sum(matmul_flops(v) for v in inner)
      if name == "scan":
        count *= params["length"]
      elif name == "shard_map":  # the body's shapes are one device's: every device runs it
        count *= int(np.prod([params["mesh"].shape[a] for a in params["newly_manual_axes"]]))
      total += count
  return total


def blocked_attention_flops(unet, latent_size: int, batch: int) -> int:
  """Forward FLOPs of the self-attention that takes a blocked kernel (at least
  `attention_kernels.LONG` tokens), which XLA's count leaves out when the kernel is a Mosaic
  call: the two matmuls, 4 B T^2 C per transformer block at T tokens and C channels. A train
  step does about 3x this (the backward's four matmuls, without the kernel's recomputation)."""
  n = len(unet.down_blocks)
  levels = (
    [(block, i) for i, block in enumerate(unet.down_blocks)]
    + [(unet.mid_block, n - 1)]
    + [(block, n - 1 - i) for i, block in enumerate(unet.up_blocks)]
  )
  total = 0
  for block, level in levels:
    tokens = (latent_size // 2**level) ** 2
    if block.attentions is None or tokens < LONG:
      continue
    for transformer in block.attentions:
      for layer in transformer.transformer_blocks:
        total += 4 * batch * tokens**2 * layer.attn1.to_q.kernel.shape[-1]
  return total


def abstract_networks(
  unet, vae: dict, text: dict, vision: dict, text_2: dict | None = None, *, dtype=jnp.bfloat16
) -> Networks:
  """A whole Stable Diffusion model with its image encoder, by shape."""
  kw = lambda: dict(dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))  # Rngs of its own trace
  return Networks(
    unet=unet,
    vae=abstract(lambda: AutoencoderKL(VAEConfig.from_diffusers(vae), **kw())),
    text_encoder=abstract(
      lambda: CLIPTextModel(CLIPTextConfig.from_transformers(text, with_projection=False), **kw())
    ),
    text_encoder_2=None
    if text_2 is None
    else abstract(
      lambda: CLIPTextModel(CLIPTextConfig.from_transformers(text_2, with_projection=True), **kw())
    ),
    image_encoder=abstract(
      lambda: CLIPVisionModelWithProjection(CLIPVisionConfig.from_transformers(vision), **kw())
    ),
  )


def sampling_request(
  networks: Networks, *, num_samples: int, size: int, steps: int = 50, guidance: bool = True
) -> tuple[Plan, Inputs]:
  """The plan and abstract inputs of text + one image prompt, with CFG and DDIM."""
  unet, vae = networks.unet, networks.vae
  f = 2 ** (len(vae.config.block_out_channels) - 1)
  latent = size // f
  tokens = networks.text_encoder.config.max_position_embeddings
  vision = networks.image_encoder.config
  s = jax.ShapeDtypeStruct
  rows = 2 * num_samples if guidance else num_samples
  adapter = AdapterInputs(
    scale=s((len(unet.decoupled_layers()),), jnp.float32),
    window=s((steps,), jnp.float32),
    pixels=s((1, 1, vision.image_size, vision.image_size, vision.num_channels), jnp.float32),
  )
  sdxl = networks.text_encoder_2 is not None
  inputs = Inputs(
    ids=s((2, tokens), jnp.int32),
    latents=s((num_samples, latent, latent, vae.config.latent_channels), jnp.float32),
    key=jax.eval_shape(lambda: jax.random.key(0)),
    guidance_scale=s((), jnp.float32),
    eta=s((), jnp.float32),
    ids_2=s((2, tokens), jnp.int32) if sdxl else None,
    time_ids=s((rows, 6), jnp.float32) if sdxl else None,
    adapters=(adapter,),
  )
  plan = Plan(
    sampler=DDIM.stable_diffusion(),
    num_inference_steps=steps,
    num_samples=num_samples,
    guidance=guidance,
    stochastic=False,
    adapters=(
      AdapterPlan(
        image_features=unet.adapter_config.image_features,
        num_images=1,
        masked=False,
        weighted=False,
        precomputed=False,
        negative_image=False,
      ),
    ),
    sdxl_zero_negative=False,
  )
  return plan, inputs


def sampling_program(networks: Networks, mesh, plan: Plan, inputs: Inputs):
  """(program, abstract arguments): the sampling program on `mesh` (a one-axis "data" mesh, as
  the pipeline's), the weights replicated, the start noise split over the devices where it
  divides."""
  graphdef, state = nnx.split(networks)
  replicated = NamedSharding(mesh, P())
  input_shardings = jax.tree.map(lambda _: replicated, inputs).replace(
    latents=latents_sharding(mesh, inputs.latents.shape[0])
  )
  program = lambda state, inputs: generate(graphdef, state, inputs, plan=plan)
  return (
    jax.jit(program, in_shardings=(jax.tree.map(lambda _: replicated, state), input_shardings)),
    (sharding.abstract(state, replicated), sharding.abstract(inputs, input_shardings)),
  )


def compile_sampling(networks: Networks, mesh, plan: Plan, inputs: Inputs):
  """The compiled `sampling_program`."""
  program, args = sampling_program(networks, mesh, plan, inputs)
  return program.lower(*args).compile()


def data_mesh(devices) -> jax.sharding.Mesh:
  """The sampling pipeline's one-axis mesh over `devices`."""
  devices = list(devices)
  return jax.make_mesh(
    (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


_SHAPE = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u8|u16|u32|u64|f16|bf16|f32|f64)\[([0-9,]*)\]")
_BYTES = {
  "pred": 1,
  "s4": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}
# `%name = SHAPE op(` or `op-start(`; SHAPE is one array or a tuple (with layouts and comments).
_OP = re.compile(r"= (\(.*?\)|\w+\[[0-9,]*\]\S*) (" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _arrays(shape_text: str) -> list[tuple[int, int]]:
  """(elements, bytes) of each array in an HLO shape."""
  out = []
  for dtype, dims in _SHAPE.findall(shape_text):
    elements = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    out.append((elements, elements * _BYTES[dtype]))
  return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {count, elements, bytes}} of the collectives in an optimized HLO module. An async
  op's start counts once, with its results' arrays (an all-gather's gathered output, an
  all-reduce's summed arrays)."""
  out: dict[str, dict[str, int]] = {}
  for shape, op, start in _OP.findall(hlo_text):
    arrays = _arrays(shape)
    if start and op in ("all-gather", "collective-permute", "all-to-all") and len(arrays) > 1:
      arrays = arrays[len(arrays) // 2 :]  # (operands..., results...): the results
    entry = out.setdefault(op, {"count": 0, "elements": 0, "bytes": 0})
    entry["count"] += 1
    entry["elements"] += sum(e for e, _ in arrays)
    entry["bytes"] += sum(b for _, b in arrays)
  return out


def report(compiled) -> dict:
  """What the compiler says of a compiled program, per device: memory (bytes), FLOPs and bytes
  accessed (XLA's count, which leaves out Mosaic kernels), collectives, Mosaic kernels."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  text = compiled.as_text()
  figures = {
    name: int(getattr(memory, f"{name}_size_in_bytes"))
    for name in ("argument", "output", "alias", "temp", "generated_code")
  }
  figures["total"] = figures["argument"] + figures["output"] - figures["alias"] + figures["temp"]
  return {
    "memory": figures,
    "flops": float(cost.get("flops", float("nan"))),
    "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
    "collectives": collectives(text),
    "mosaic_kernels": text.count(MOSAIC_CALL),
  }


def adapter_size(unet) -> tuple[int, int]:
  """(parameters, bytes) of the adapter's weights: what its gradient all-reduce carries."""
  leaves = jax.tree.leaves(nnx.state(unet, AdapterParam))
  return (
    int(sum(np.prod(x.shape) for x in leaves)),
    int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)),
  )


__all__ = [
  "COLLECTIVES",
  "MOSAIC_CALL",
  "abstract_networks",
  "abstract_unet",
  "adapter_size",
  "blocked_attention_flops",
  "cached_batch",
  "collectives",
  "compile_sampling",
  "compile_train_step",
  "data_mesh",
  "matmul_flops",
  "report",
  "sampling_program",
  "sampling_request",
  "tpu_devices",
  "tpu_mesh",
  "train_step",
]
