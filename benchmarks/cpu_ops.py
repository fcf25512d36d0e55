r"""Where a CPU step's time goes: the sd15-small UNet's main operations, XLA against PyTorch.

  python benchmarks/cpu_ops.py

Each operation at the shapes it has in the sd15-small UNet forward (batch 4): 3x3 convolutions
at every level, the self-attention at 32x32, and a dense layer, timed alone (median of repeats)
in JAX (jit, NHWC) and PyTorch (NCHW, oneDNN), with the ratio. benchmarks/RESULTS.md explains
the CPU rows of speed.py with it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

import speed  # benchmarks/ is the script's own folder

median_time = functools.partial(speed.median_time, repeats=20)


def conv(batch: int, size: int, channels: int):
  x = np.random.default_rng(0).standard_normal((batch, size, size, channels), np.float32)
  w = np.random.default_rng(1).standard_normal((3, 3, channels, channels), np.float32)
  f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
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


def dense(rows: int, features: int):
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((rows, features), np.float32), rng.standard_normal(
      (features, features), np.float32)
  f = jax.jit(jnp.matmul)
  xj, wj, xt, wt = jnp.asarray(x), jnp.asarray(w), torch.from_numpy(x), torch.from_numpy(w)
  with torch.no_grad():
    t = median_time(lambda: xt @ wt)
  return median_time(lambda: f(xj, wj).block_until_ready()), t


def main():
  torch.set_num_threads(torch.get_num_threads())
  rows = [("conv 3x3, 32x32x64", conv(4, 32, 64)), ("conv 3x3, 16x16x128", conv(4, 16, 128)),
          ("conv 3x3, 8x8x256", conv(4, 8, 256)), ("conv 3x3, 4x4x256", conv(4, 4, 256)),
          ("self-attention, 1024 tokens, 8x8 heads", attention(4, 1024, 8, 8)),
          ("self-attention, 256 tokens, 8x16 heads", attention(4, 256, 8, 16)),
          ("dense 4096x64 @ 64x64", dense(4096, 64)), ("dense 256x256 @ 256x256", dense(256, 256))]
  print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")
  print("| operation | JAX | PyTorch | JAX / PyTorch |\n|---|---|---|---|")
  for name, (j, t) in rows:
    print(f"| {name} | {j * 1e3:.3f} ms | {t * 1e3:.3f} ms | {j / t:.2f} |")


if __name__ == "__main__":
  main()
