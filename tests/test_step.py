"""The train step's pieces: min-SNR weighting, latent scaling, condition dropout, the loop's
read-back of step outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipadapter_jax.diffusion.schedule import NoiseSchedule
from ipadapter_jax.models.vae import VAEConfig, scale_latents, unscale_latents
from ipadapter_jax.train import loop
from ipadapter_jax.train.checks import TrainingError
from ipadapter_jax.train.step import StepSpec, clean_latents, drop_masks, min_snr_weight


def _spec(**kw):
  base = dict(
    schedule=NoiseSchedule.stable_diffusion(),
    image_features=None,
    drop_image=0.0,
    drop_text=0.0,
    drop_both=0.0,
    cached=True,
    latents=None,
  )
  return StepSpec(**{**base, **kw})


@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_is_the_papers_x0_weight(prediction_type, gamma):
  """Hang et al. 2023: the loss is min(SNR_t, gamma) * ||x0 - x0_hat||^2 whatever the model
  predicts; a prediction of eps or v converts to an x0 estimate through x_t."""
  rng = np.random.default_rng(0)
  abar = NoiseSchedule.stable_diffusion().alphas_cumprod().astype(np.float64)
  t = np.array([0, 10, 200, 500, 999])
  a = abar[t][:, None]
  x0, eps, x0_hat = (rng.standard_normal((len(t), 16)) for _ in range(3))
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
  eps_hat = (x_t - np.sqrt(a) * x0_hat) / np.sqrt(1 - a)
  v, v_hat = (np.sqrt(a) * e - np.sqrt(1 - a) * x for e, x in ((eps, x0), (eps_hat, x0_hat)))
  pairs = {"epsilon": (eps_hat, eps), "v_prediction": (v_hat, v), "sample": (x0_hat, x0)}
  pred, target = pairs[prediction_type]
  snr = abar[t] / (1 - abar[t])
  weight = np.asarray(min_snr_weight(jnp.asarray(snr, jnp.float32), gamma, prediction_type))
  ours = weight * np.mean((pred - target) ** 2, axis=1)
  paper = np.minimum(snr, gamma) * np.mean((x0_hat - x0) ** 2, axis=1)
  np.testing.assert_allclose(ours, paper, rtol=1e-5)


def test_latents_are_shifted_then_scaled():
  config = VAEConfig(scaling_factor=0.5, shift_factor=0.1)
  mean = jnp.full((2, 4, 4, 4), 0.7)
  batch = {"latent_mean": mean, "latent_logvar": jnp.full(mean.shape, -30.0)}  # std ~ 3e-7
  x0 = clean_latents(None, batch, jax.random.key(0), _spec(latents=config))
  np.testing.assert_allclose(x0, (0.7 - 0.1) * 0.5, atol=1e-6)
  np.testing.assert_allclose(unscale_latents(scale_latents(mean, config), config), mean, rtol=1e-6)
  pixels = {"pixels": jnp.ones((1, 4, 4, 3))}  # pixel space: no scaling at all
  np.testing.assert_array_equal(clean_latents(None, pixels, jax.random.key(0), _spec()), 1.0)


def test_drop_masks_follow_one_draw_per_example():
  spec = _spec(drop_image=0.1, drop_text=0.2, drop_both=0.3)
  image, text = (np.asarray(m) for m in drop_masks(jax.random.key(0), 20_000, spec))
  assert abs(np.mean(image & ~text) - 0.1) < 0.01
  assert abs(np.mean(text & ~image) - 0.2) < 0.01
  assert abs(np.mean(image & text) - 0.3) < 0.01


def _out(loss=1.0, grad_norm=1.0, param_norm=1.0):
  return {
    "loss": jnp.float32(loss),
    "grad_norm": jnp.float32(grad_norm),
    "param_norm": jnp.float32(param_norm),
  }


def test_step_outputs_measure_the_real_interval(monkeypatch):
  clock = iter([100.0, 103.0, 104.0])
  monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
  outputs = loop.StepOutputs(batch_size=8, lr_schedule=lambda step: 0.5)
  for step, loss in ((6, 1.0), (7, 2.0), (8, 3.0)):  # a run resumed at step 5, logging at 8
    outputs.add(step, _out(loss, grad_norm=2 * loss))
  first = outputs.summary(last_checkpoint=5)
  assert first == {
    "loss": 2.0,
    "grad_norm": 4.0,
    "learning_rate": 0.5,
    "examples_per_second": 3 * 8 / 3.0,
  }
  outputs.add(9, _out(1.0))  # a short last one
  assert outputs.summary(last_checkpoint=8)["examples_per_second"] == 1 * 8 / 1.0


@pytest.mark.parametrize("name", ["loss", "grad_norm", "param_norm"])
def test_a_non_finite_output_is_named_by_its_step(name):
  """Gradients or parameters that overflow under a finite loss stop the run as a NaN loss does."""
  outputs = loop.StepOutputs(batch_size=8, lr_schedule=lambda step: 0.5)
  outputs.add(11, _out())
  outputs.add(12, _out(**{name: np.inf}))
  with pytest.raises(TrainingError, match=rf"non-finite {name} \(inf\) at step 12.*step 10\) is "):
    outputs.check(last_checkpoint=10)
  outputs = loop.StepOutputs(batch_size=8, lr_schedule=lambda step: 0.5)
  outputs.add(1, _out(**{name: np.nan}))
  with pytest.raises(TrainingError, match=r"at step 1; .* no checkpoint was saved before it"):
    outputs.check(last_checkpoint=None)


def test_a_step_with_non_finite_gradients_keeps_its_state(monkeypatch):
  """A finite loss whose gradient is NaN (sqrt at 0) neither moves the weights nor the step
  counter, so that what the loop saves never holds a NaN."""
  import optax

  from ipadapter_jax.train import step as step_module

  monkeypatch.setattr(
    step_module, "loss_fn", lambda params, *args: jnp.sum(jnp.sqrt(jnp.abs(params["w"])))
  )
  params = {"w": jnp.array([0.0, 1.0])}
  optimizer = optax.adam(0.1)
  state = step_module.TrainState(jnp.int32(3), params, optimizer.init(params), None)
  new, out = step_module.train_step(
    state, None, None, None, jax.random.key(0), graphdef=None, spec=_spec(), optimizer=optimizer
  )
  assert np.isfinite(out["loss"]) and not np.isfinite(out["grad_norm"])
  assert int(new.step) == 3
  np.testing.assert_array_equal(new.params["w"], params["w"])


def test_ema_follows_diffusers_ema_model():
  """Our train step's EMA equals diffusers' EMAModel (default warm-up (1 + s) / (10 + s),
  capped) over a run's first updates and past the cap; a constant decay from the start would
  keep 0.999 of the initial weights after one step."""
  import torch
  from diffusers.training_utils import EMAModel

  from ipadapter_jax.train.step import ema_decay_at

  rng = np.random.default_rng(0)
  weights = [rng.standard_normal(5).astype(np.float32) for _ in range(40)]
  param = torch.nn.Parameter(torch.tensor(weights[0]))
  reference = EMAModel([param], decay=0.9)
  ours = weights[0].astype(np.float64)
  for step, w in enumerate(weights[1:]):  # `step` earlier updates
    param.data = torch.tensor(w)
    reference.step([param])
    decay = float(ema_decay_at(step, 0.9))
    assert decay == pytest.approx(reference.cur_decay_value, abs=1e-7), step
    ours = decay * ours + (1 - decay) * w
  np.testing.assert_allclose(ours, reference.shadow_params[0].numpy(), rtol=1e-5, atol=1e-6)
  assert float(ema_decay_at(0, 0.9)) == 0.0
  assert float(ema_decay_at(1000, 0.9)) == pytest.approx(0.9)  # float32


def test_autoencoder_loss_matches_diffusers_vae():
  """The VAE objective on diffusers' AutoencoderKL with the same weights and posterior noise:
  MSE of the decoded draw plus the weighted KL (a wrong sign, mean or scale in either is caught)."""
  import tempfile

  import torch
  from diffusers import AutoencoderKL

  from ipadapter_jax.models.vae import AutoencoderKL as JaxVAE
  from ipadapter_jax.train.step import autoencoder_loss
  from ipadapter_jax.weights.diffusers import load_vae
  from tests.torch_reference import VAE_LIKE, randomize_

  reference = randomize_(AutoencoderKL(**VAE_LIKE), 0).eval()
  with tempfile.TemporaryDirectory() as folder:
    reference.save_pretrained(folder)
    vae = load_vae(folder)
  assert isinstance(vae, JaxVAE)
  pixels = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  key, kl_weight = jax.random.key(3), 0.25
  got = float(autoencoder_loss(vae, jnp.asarray(pixels), key, kl_weight))
  with torch.no_grad():
    posterior = reference.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).latent_dist
    noise = np.asarray(jax.random.normal(key, posterior.mean.permute(0, 2, 3, 1).shape))
    z = posterior.mean + posterior.std * torch.from_numpy(noise).permute(0, 3, 1, 2)
    decoded = reference.decode(z).sample.permute(0, 2, 3, 1)
    mse = torch.mean((decoded - torch.from_numpy(pixels)) ** 2)
    kl = 0.5 * torch.mean(posterior.mean**2 + posterior.var - 1.0 - posterior.logvar)
  expected = float(mse + kl_weight * kl)
  print(f"autoencoder loss: {got:.7f} vs diffusers {expected:.7f}")
  np.testing.assert_allclose(got, expected, rtol=1e-5)
