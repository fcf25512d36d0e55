"""DDPM schedule, forward process and DDIM against diffusers' DDIMScheduler."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ipadapter_jax.diffusion import (
  DDIM,
  NoiseSchedule,
  add_noise,
  predicted_x0,
  training_target,
  velocity,
)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CASES = [
  dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),  # Stable Diffusion
  dict(SD, timestep_spacing="trailing", set_alpha_to_one=True),
  dict(SD, timestep_spacing="linspace", clip_sample=True, clip_sample_range=0.5),
  dict(beta_schedule="linear", prediction_type="v_prediction", clip_sample=False),
  dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", steps_offset=1),
  dict(
    SD,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    clip_sample=False,
  ),
]


@pytest.mark.parametrize("config", CASES)
@pytest.mark.parametrize("steps", [10, 50, 7])
def test_ddim_matches_diffusers(config, steps):
  theirs = DDIMScheduler(**config)
  ours = DDIM.from_diffusers(dict(theirs.config))
  np.testing.assert_allclose(
    ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=2e-6, atol=1e-9
  )
  theirs.set_timesteps(steps)
  np.testing.assert_array_equal(ours.timesteps(steps), theirs.timesteps.numpy())
  g = torch.Generator().manual_seed(0)
  x = torch.randn(2, 4, 8, 8, generator=g)
  for t in theirs.timesteps:  # each step from the same input: errors do not compound
    out = torch.randn(2, 4, 8, 8, generator=g)
    expected = theirs.step(out, t, x, eta=0.0).prev_sample
    actual = ours.step(
      jnp.asarray(out.numpy()), int(t), jnp.asarray(x.numpy()), num_inference_steps=steps
    )
    err = np.abs(np.asarray(actual) - expected.numpy()).max()
    assert err <= 1e-6 * max(1.0, float(expected.abs().max())), f"t={int(t)}: {err:.2e}"
    x = expected


def test_eta_noise_matches_diffusers_and_has_the_right_variance():
  theirs = DDIMScheduler(**CASES[0])
  ours = DDIM.from_diffusers(dict(theirs.config))
  theirs.set_timesteps(20)
  t, t_prev = 501, 451
  x, out = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
  noise = torch.randn(1, 4, 8, 8)
  expected = theirs.step(out, t, x, eta=0.7, variance_noise=noise).prev_sample.numpy()
  actual = ours.step(
    jnp.asarray(out.numpy()),
    t,
    jnp.asarray(x.numpy()),
    num_inference_steps=20,
    eta=0.7,
    noise=jnp.asarray(noise.numpy()),
  )
  np.testing.assert_allclose(np.asarray(actual), expected, atol=1e-6)
  # The added noise has variance eta^2 (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev).
  a = ours.alphas_cumprod
  expected_var = 0.7**2 * (1 - a[t_prev]) / (1 - a[t]) * (1 - a[t] / a[t_prev])
  rng = np.random.default_rng(0)
  noises = jnp.asarray(rng.standard_normal((4000, 16)), jnp.float32)
  zero = jnp.zeros((4000, 16))
  draws = ours.step(zero, t, zero, num_inference_steps=20, eta=0.7, noise=noises)
  assert abs(float(np.var(np.asarray(draws))) / expected_var - 1) < 0.05


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_forward_process_matches_diffusers(prediction_type):
  theirs = DDPMScheduler(**SD, prediction_type=prediction_type)
  ours = NoiseSchedule.from_diffusers(dict(theirs.config))
  assert ours == NoiseSchedule.stable_diffusion(prediction_type=prediction_type)
  x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
  t = torch.tensor([0, 500, 999])
  a = ours.alphas_cumprod()
  np.testing.assert_allclose(
    add_noise(a, x0.numpy(), eps.numpy(), t.numpy()),
    theirs.add_noise(x0, eps, t).numpy(),
    atol=1e-6,
  )
  np.testing.assert_allclose(
    velocity(a, x0.numpy(), eps.numpy(), t.numpy()),
    theirs.get_velocity(x0, eps, t).numpy(),
    atol=1e-6,
  )
  target = training_target(ours, a, x0.numpy(), eps.numpy(), t.numpy())
  expected = {"epsilon": eps, "sample": x0, "v_prediction": theirs.get_velocity(x0, eps, t)}
  np.testing.assert_allclose(target, expected[prediction_type].numpy(), atol=1e-6)


def test_sd_scheduler_config_and_overrides():
  pndm = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
  }
  assert DDIM.from_diffusers(pndm) == DDIM.stable_diffusion()
  assert DDIM.from_diffusers(pndm, timestep_spacing="trailing").timestep_spacing == "trailing"
  with pytest.raises(ValueError, match="unknown setting 'num_steps'"):
    DDIM.from_diffusers(pndm, num_steps=3)
  with pytest.raises(ValueError, match="'thresholding'=True is not supported"):
    DDIM.from_diffusers(dict(pndm, thresholding=True))
  with pytest.raises(ValueError, match="beta_schedule='cosine'"):
    DDIM.from_diffusers(dict(pndm, beta_schedule="cosine"))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_inverts_each_training_target(kind):
  schedule = NoiseSchedule.stable_diffusion(prediction_type=kind)
  alphas = schedule.alphas_cumprod()
  rng = np.random.default_rng(0)
  x0, eps = (jnp.asarray(a, jnp.float32) for a in rng.standard_normal((2, 3, 4, 4, 2)))
  t = jnp.asarray([10, 500, 990])
  target = training_target(schedule, alphas, x0, eps, t)
  a = jnp.asarray(alphas)[t][:, None, None, None]
  x0_hat = predicted_x0(kind, target, add_noise(alphas, x0, eps, t), jnp.sqrt(a), jnp.sqrt(1 - a))
  # At t=990 sqrt(alpha_bar) is about 0.07: epsilon's division magnifies float32 rounding.
  np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=2e-5)
  with pytest.raises(ValueError, match="prediction_type"):
    predicted_x0("flow", target, x0, 1.0, 0.0)
