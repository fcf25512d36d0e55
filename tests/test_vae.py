"""AutoencoderKL against diffusers, real size by shape, legacy key names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx
from safetensors.torch import save_file

from ipadapter_jax.models.released import SD_VAE
from ipadapter_jax.models.vae import (
  AutoencoderKL,
  VAEConfig,
  sample_posterior,
  scale_latents,
  unscale_latents,
)
from ipadapter_jax.weights import load_vae
from ipadapter_jax.weights.files import read_safetensors
from tests import torch_reference as ref


def _torch_vae(tmp_path, **overrides):
  model = ref.randomize_(TorchAutoencoderKL(**dict(ref.VAE_LIKE, **overrides)), 0)
  model.save_pretrained(tmp_path)
  return model


def test_encode_moments_and_decode_parity(tmp_path):
  torch_vae = _torch_vae(tmp_path, scaling_factor=0.5, shift_factor=0.1)
  vae = load_vae(str(tmp_path))
  x = torch.rand(2, 3, 16, 12) * 2 - 1
  with torch.no_grad():
    posterior = torch_vae.encode(x).latent_dist
    decoded = torch_vae.decode(posterior.mean).sample
  mean, logvar = vae.encode(jnp.asarray(x.numpy()), layout="NCHW")
  errs = [
    ref.assert_close(mean, posterior.mean.numpy()),
    ref.assert_close(logvar, posterior.logvar.numpy()),
    ref.assert_close(
      vae.decode(jnp.asarray(posterior.mean.numpy()), layout="NCHW"), decoded.numpy()
    ),
  ]
  print(f"vae: mean {errs[0]:.1e}, logvar {errs[1]:.1e}, decode {errs[2]:.1e}")
  z = jnp.ones((1, 2, 2, 4))
  np.testing.assert_allclose(scale_latents(z, vae.config), (1 - 0.1) * 0.5)
  np.testing.assert_allclose(
    unscale_latents(scale_latents(z, vae.config), vae.config), z, rtol=1e-6
  )


def test_without_quant_convs_and_mid_attention(tmp_path):
  torch_vae = _torch_vae(
    tmp_path, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False
  )
  vae = load_vae(str(tmp_path))
  x = torch.rand(1, 3, 8, 8)
  with torch.no_grad():
    expected = torch_vae.decode(torch_vae.encode(x).latent_dist.mode()).sample.numpy()
  mean, _ = vae.encode(jnp.asarray(x.numpy()), layout="NCHW")
  ref.assert_close(vae.decode(mean, layout="NCHW"), expected)


def test_legacy_attention_names_load(tmp_path):
  """VAEs saved before diffusers 0.14 name the mid-block attention query/key/value/proj_attn."""
  torch_vae = _torch_vae(tmp_path)
  path = tmp_path / "diffusion_pytorch_model.safetensors"
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for key, value in read_safetensors(str(path)).items():
    for new, old in renames.items():
      key = key.replace(f".{new}.", f".{old}.")
    legacy[key] = torch.from_numpy(np.array(value))
  assert "encoder.mid_block.attentions.0.query.weight" in legacy
  save_file(legacy, str(path))
  x = torch.rand(1, 3, 8, 8)
  with torch.no_grad():
    expected = torch_vae.encode(x).latent_dist.mean.numpy()
  ref.assert_close(
    load_vae(str(tmp_path)).encode(jnp.asarray(x.numpy()), layout="NCHW")[0], expected
  )


def test_posterior_sample_statistics():
  mean = jnp.full((4, 16, 16, 4), 2.0)
  logvar = jnp.full((4, 16, 16, 4), np.log(0.25))
  draws = np.asarray(sample_posterior(mean, logvar, jax.random.key(0)))
  assert abs(draws.mean() - 2.0) < 0.02 and abs(draws.std() - 0.5) < 0.02


def test_sd15_vae_size_by_shape():
  model = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig.from_diffusers(SD_VAE), rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert count == 83_653_863


def test_unsupported_vae_config_names_the_key():
  with pytest.raises(ValueError, match="'down_block_types'"):
    VAEConfig.from_diffusers(dict(SD_VAE, down_block_types=["AttnDownEncoderBlock2D"] * 4))
  with pytest.raises(ValueError, match="unknown key 'use_tiling'"):
    VAEConfig.from_diffusers(dict(SD_VAE, use_tiling=True))
