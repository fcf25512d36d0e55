"""Building blocks against their PyTorch counterparts."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from ipadapter_jax.models.embeddings import timestep_features
from ipadapter_jax.models.layers import GroupNorm, LayerNorm
from ipadapter_jax.models.resnet import resize_nearest
from tests import torch_reference as ref


@pytest.mark.parametrize("dim,flip,shift", [(32, True, 0), (33, False, 1), (256, True, 0)])
def test_timestep_features_match_diffusers(dim, flip, shift):
  t = torch.tensor([0, 1, 17, 500, 999, 3.5])
  expected = get_timestep_embedding(
    t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
  ).numpy()
  actual = timestep_features(jnp.asarray(t.numpy()), dim, flip_sin_to_cos=flip, freq_shift=shift)
  # Arguments reach 999 rad, where one float32 ulp is 6e-5: a 1-ulp difference between the two
  # libraries' exp() moves sin/cos by up to that much, so 1e-4 is the honest bound here.
  ref.assert_close(actual, expected, rel=1e-4)


@pytest.mark.parametrize(
  "size_in,size_out", [((3, 5), (6, 10)), ((3, 3), (5, 6)), ((4, 7), (7, 13))]
)
def test_nearest_resize_matches_torch(size_in, size_out):
  x = torch.randn(2, 3, *size_in)
  expected = torch.nn.functional.interpolate(x, size=size_out, mode="nearest").numpy()
  actual = resize_nearest(jnp.asarray(x.numpy()).transpose(0, 2, 3, 1), size_out)
  np.testing.assert_array_equal(np.asarray(actual).transpose(0, 3, 1, 2), expected)


def test_norms_match_torch_with_offset_inputs():
  x = torch.randn(2, 5, 4, 16) * 3 + 10  # a large mean tests the two-pass variance
  gn = ref.randomize_(torch.nn.GroupNorm(4, 16, eps=1e-6), 0)
  ln = ref.randomize_(torch.nn.LayerNorm(16), 1)
  ours_gn, ours_ln = GroupNorm(4, 16, eps=1e-6), LayerNorm(16)
  for ours, theirs in ((ours_gn, gn), (ours_ln, ln)):
    ours.scale.set_value(jnp.asarray(theirs.weight.detach().numpy()))
    ours.bias.set_value(jnp.asarray(theirs.bias.detach().numpy()))
  with torch.no_grad():
    expected_gn = gn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    expected_ln = ln(x).numpy()
  ref.assert_close(ours_gn(jnp.asarray(x.numpy())), expected_gn)
  ref.assert_close(ours_ln(jnp.asarray(x.numpy())), expected_ln)


def test_norm_statistics_are_float32_for_bfloat16_inputs():
  x = (jnp.arange(64, dtype=jnp.float32).reshape(1, 64) * 0.01 + 100).astype(jnp.bfloat16)
  y = LayerNorm(64, dtype=jnp.bfloat16)(x)
  assert y.dtype == jnp.bfloat16
  expected = (np.asarray(x, np.float32) - np.asarray(x, np.float32).mean()) / np.asarray(
    x, np.float32
  ).std()
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=0.02)
