"""Region masks prepared and downsampled exactly as diffusers' IPAdapterMaskProcessor does."""

import warnings

import numpy as np
import pytest
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

from ipadapter_jax.generation import masks as mask_ops


@pytest.mark.parametrize(
  "height,width,queries", [(64, 64, 64), (64, 64, 16), (48, 64, 12), (64, 48, 48), (40, 40, 25)]
)
def test_masks_are_prepared_and_downsampled_as_diffusers_does(height, width, queries):
  rng = np.random.default_rng(queries)
  image = Image.fromarray(rng.integers(0, 256, (height + 7, width + 3, 3), dtype=np.uint8))
  theirs = IPAdapterMaskProcessor().preprocess([image], height=height, width=width)
  ours = mask_ops.preprocess_mask(image, height, width)
  np.testing.assert_array_equal(ours, theirs[0, 0].numpy())
  with warnings.catch_warnings():  # diffusers warns when the grid does not fill T exactly
    warnings.simplefilter("ignore")
    expected = IPAdapterMaskProcessor.downsample(theirs[:, 0], 2, queries, 3)[0, :, 0].numpy()
  np.testing.assert_array_equal(mask_ops.downsample_mask(ours, queries), expected)


def test_layer_masks_give_every_layer_its_own_query_count():
  left = np.zeros((16, 16), np.float32)
  left[:, :8] = 1
  out = mask_ops.layer_masks([left, 1 - left], [64, 16, 64])
  assert [m.shape for m in out] == [(1, 64, 2), (1, 16, 2), (1, 64, 2)]
  # An 8x8 grid of the 64 queries: the left half of every row is the first mask's.
  grid = out[0][0, :, 0].reshape(8, 8)
  np.testing.assert_allclose(grid[:, :3], 1.0, atol=1e-6)
  np.testing.assert_allclose(grid[:, 5:], 0.0, atol=1e-6)
  np.testing.assert_allclose(out[0][0, :, 0] + out[0][0, :, 1], 1.0, atol=1e-6)


def test_a_mask_needs_an_output_of_at_least_8_pixels():
  with pytest.raises(ValueError, match="at least 8x8"):
    mask_ops.preprocess_mask(Image.new("L", (4, 4)), 7, 64)
