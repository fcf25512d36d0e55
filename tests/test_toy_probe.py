"""The caption-word probe: swaps the right word and reads the model's one-step prediction right."""

from ipadapter_jax import toy
from ipadapter_jax.toy import probe as toy_probe
from ipadapter_jax.toy.configs import world as toy_world


def test_swapped_values_always_differ_and_vary():
  examples = toy.held_out(24)
  for attribute in toy_probe.ATTRIBUTES:
    other = toy_probe.swapped_values(examples, attribute)
    assert all(o != getattr(ex, attribute) for o, ex in zip(other, examples))
    assert len(set(other)) > 2


def test_the_shipped_base_follows_a_swapped_colour_word():
  # The shipped base draws the asked colour (README: 96%), so at nearly pure noise its one-step
  # prediction (decoded by its VAE) must follow the colour word: a swapped word wins, the true
  # colour is gone. A wrong x0 formula for v-prediction, latents left unscaled, a swap that
  # changed nothing or a judge reading the wrong attribute would each put these rates near
  # chance (17%).
  result = toy_probe.probe(toy_world.SHIPPED + "/base", count=48, timesteps=[950])
  colour = result["colour"][950]
  assert colour["true caption"]["true value"] > 0.4, colour
  assert colour["swapped caption"]["swapped value"] > 0.4, colour
  assert colour["swapped caption"]["true value"] < 0.2, colour
  assert 0 < colour["alpha_bar"] < 0.01  # scaled-linear betas: 0.0082 at t = 950
  assert "| shape | 950" in toy_probe.table(result)
