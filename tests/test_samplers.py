"""The samplers against diffusers' schedulers: the same timesteps and sigmas, and the same samples
over whole runs of a fixed synthetic model (the ancestral ones fed the noise diffusers draws)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
  DDIMScheduler,
  DDPMScheduler,
  DPMSolverMultistepScheduler,
  EulerAncestralDiscreteScheduler,
  EulerDiscreteScheduler,
  UniPCMultistepScheduler,
)

from ipadapter_jax.diffusion.samplers import (
  DDIM,
  DDPM,
  DPMSolverPP,
  Euler,
  EulerAncestral,
  Tables,
  UniPC,
  first_step,
)

SD = dict(
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule="scaled_linear",
  clip_sample=False,
  set_alpha_to_one=False,
  steps_offset=1,
)  # Stable Diffusion's DDIM config
CONFIGS = {
  "sd": SD,
  "sd, v-prediction, trailing": dict(
    SD, prediction_type="v_prediction", timestep_spacing="trailing"
  ),
  "linear, linspace": dict(beta_schedule="linear", timestep_spacing="linspace"),
}
SAMPLERS = {
  "ddim": (DDIMScheduler, DDIM, {}),
  "euler": (EulerDiscreteScheduler, Euler, {}),
  "euler_karras": (EulerDiscreteScheduler, Euler, {"use_karras_sigmas": True}),
  "dpmpp_2m": (DPMSolverMultistepScheduler, DPMSolverPP, {}),
  "dpmpp_2m_karras": (DPMSolverMultistepScheduler, DPMSolverPP, {"use_karras_sigmas": True}),
  "euler_a": (EulerAncestralDiscreteScheduler, EulerAncestral, {}),
  "ddpm": (DDPMScheduler, DDPM, {}),
  "unipc": (UniPCMultistepScheduler, UniPC, {}),
  "unipc_karras": (UniPCMultistepScheduler, UniPC, {"use_karras_sigmas": True}),
  "unipc_order1": (UniPCMultistepScheduler, UniPC, {"solver_order": 1}),
  "unipc_sigma_min": (
    UniPCMultistepScheduler,
    UniPC,
    {"final_sigmas_type": "sigma_min", "lower_order_final": False, "disable_corrector": [2]},
  ),
}


def _model(x, t, xp):
  """A fixed, smooth stand-in for a UNet: depends on the input and the timestep."""
  return 0.7 * x * xp.cos(t / 700.0) + 0.2 * xp.sin(3.0 * x + t / 300.0)


def _theirs(cls, config, extra, steps, x, seed=0):
  scheduler = cls.from_config(DDIMScheduler(**config).config, **extra)
  scheduler.set_timesteps(steps)
  x = torch.from_numpy(x) * scheduler.init_noise_sigma
  generator = torch.Generator().manual_seed(seed)
  noisy = "generator" in scheduler.step.__code__.co_varnames
  for t in scheduler.timesteps:
    out = _model(scheduler.scale_model_input(x, t), t.float(), torch)
    x = scheduler.step(out, t, x, **({"generator": generator} if noisy else {})).prev_sample
  return scheduler, x.numpy()


def _step_noise(scheduler, shape, seed=0, timesteps=None):
  """The noise diffusers' ancestral steps draw from a generator seeded `seed`, step by step over
  `timesteps` (all the scheduler's by default; DDPM draws none at t = 0)."""
  generator = torch.Generator().manual_seed(seed)
  ddpm = isinstance(scheduler, DDPMScheduler)
  timesteps = scheduler.timesteps if timesteps is None else timesteps
  return np.stack(
    [
      torch.randn(shape, generator=generator).numpy()
      if not ddpm or t > 0
      else np.zeros(shape, np.float32)
      for t in timesteps
    ]
  )


def _ours(sampler, steps, x, noise=None):
  tables = sampler.tables(steps)
  traced = Tables(*(jnp.asarray(a) for a in tables))
  noise = None if noise is None else jnp.asarray(noise)

  def body(i, carry):
    x, state = carry
    t = traced.timesteps[i].astype(jnp.float32)
    out = _model(sampler.scale_model_input(x, i, traced), t, jnp)
    return sampler.advance(out, i, x, state, traced, noise=None if noise is None else noise[i])

  x = jnp.asarray(x) * sampler.init_noise_sigma(tables)
  x, _ = jax.lax.fori_loop(0, steps, body, (x, sampler.init_state(x)))
  return tables, np.asarray(x)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [10, 20])
def test_whole_runs_match_diffusers(config, name, steps):
  theirs_cls, ours_cls, extra = SAMPLERS[name]
  x = np.random.default_rng(steps).standard_normal((2, 4, 8, 8)).astype(np.float32)
  scheduler, expected = _theirs(theirs_cls, CONFIGS[config], extra, steps, x)
  sampler = ours_cls.from_diffusers(dict(DDIMScheduler(**CONFIGS[config]).config), **extra)
  noise = _step_noise(scheduler, x.shape) if sampler.needs_noise else None
  tables, actual = _ours(sampler, steps, x, noise)
  expected_t = scheduler.timesteps.numpy()
  if np.issubdtype(expected_t.dtype, np.integer):
    np.testing.assert_array_equal(tables.timesteps, expected_t)
  else:  # interpolated (Karras) timesteps: float32 rounding, measured <= 3.2e-7 relative
    np.testing.assert_allclose(tables.timesteps, expected_t, rtol=1e-6)
  if hasattr(scheduler, "sigmas"):  # the sigma-space samplers
    np.testing.assert_allclose(tables.sigmas, scheduler.sigmas.numpy(), rtol=1e-6)
  err = float(np.abs(actual - expected).max())
  print(f"{name}, {config}, {steps} steps: max abs difference {err:.1e}")
  assert err <= 1e-5 * max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "unipc", "unipc_karras"])
def test_zero_terminal_snr_keeps_the_sigmas_finite(name):
  """With rescaled betas diffusers sets the last alpha_bar to 2^-24 (sigma about 4096)."""
  config = dict(
    SD, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True
  )
  theirs_cls, ours_cls, extra = SAMPLERS[name]
  x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  scheduler, expected = _theirs(theirs_cls, config, extra, 10, x)
  sampler = ours_cls.from_diffusers(dict(DDIMScheduler(**config).config), **extra)
  tables, actual = _ours(
    sampler, 10, x, _step_noise(scheduler, x.shape) if sampler.needs_noise else None
  )
  np.testing.assert_allclose(tables.sigmas, scheduler.sigmas.numpy(), rtol=1e-6)
  err = float(np.abs(actual - expected).max())
  print(f"{name}, zero terminal SNR: max abs difference {err:.1e}")
  # Samplers that work in sigma space start from x * init_noise_sigma (about 4096 * |x|): the
  # first step's x - sigma * d cancels values of that size, so each implementation's float32
  # rounding is already one ulp of the first state, which later (smaller-sigma) steps do not
  # amplify. The bound is that ulp, or the usual 2e-5 of the output scale where it is larger.
  first_state = np.float32(np.abs(x).max() * float(scheduler.init_noise_sigma))
  bound = max(2e-5 * max(1.0, float(np.abs(expected).max())), float(np.spacing(first_state)))
  print(f"{name}: bound {bound:.1e} (one ulp of the first state: {np.spacing(first_state):.1e})")
  assert err <= bound


def test_unsupported_settings_are_refused():
  with pytest.raises(ValueError, match="use_exponential_sigmas"):
    Euler.from_diffusers(dict(SD, use_exponential_sigmas=True))
  with pytest.raises(ValueError, match="order 2"):
    DPMSolverPP.from_diffusers(dict(SD, solver_order=3))
  with pytest.raises(ValueError, match="prediction_type='sample'"):
    Euler.from_diffusers(dict(SD, prediction_type="sample"))
  for key, value in [
    ("solver_order", 3),
    ("solver_type", "bh1"),
    ("predict_x0", False),
    ("use_dynamic_shifting", True),
    ("lower_order_final", False),
    ("use_flow_sigmas", True),
  ]:
    with pytest.raises(ValueError, match=key):
      UniPC.from_diffusers(dict(SD, **{key: value}))
  # DPM-Solver's solver types name bh2 for UniPC, as in diffusers.
  assert UniPC.from_diffusers(dict(SD, solver_type="midpoint")).solver_type == "bh2"
  for strength in (-0.1, 1.5):
    with pytest.raises(ValueError, match="strength"):
      first_step(10, strength)
  with pytest.raises(ValueError, match="no denoising step"):
    first_step(10, 0.05)
  assert [first_step(10, s) for s in (1.0, 0.75, 0.3, 0.1)] == [0, 3, 7, 9]


PIPELINE_SAMPLERS = {
  "euler": (EulerDiscreteScheduler, {}),
  "unipc": (UniPCMultistepScheduler, {}),
  "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
  "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}


@pytest.mark.parametrize("name", list(PIPELINE_SAMPLERS))
def test_sampling_with_an_image_prompt_matches_diffusers(tiny_world, tmp_path, name):
  """The whole pipeline (CFG, adapter, VAE) with each sampler, through sample.py's --scheduler."""
  from diffusers import StableDiffusionPipeline
  from PIL import Image

  from ipadapter_jax.cli.sample import main as sample_main

  cls, extra = PIPELINE_SAMPLERS[name]
  pipe = StableDiffusionPipeline.from_pretrained(tiny_world / "sd")
  pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
  pipe.load_ip_adapter(
    str(tiny_world / "adapter"),
    subfolder="",
    weight_name="ip-adapter.safetensors",
    image_encoder_folder="image_encoder",
  )
  pipe.set_ip_adapter_scale(0.6)
  latents = np.load(tiny_world / "latents.npy")
  expected = pipe(
    "a red circle",
    negative_prompt="green",
    num_inference_steps=4,
    guidance_scale=7.5,
    num_images_per_prompt=2,
    latents=torch.from_numpy(latents),
    height=32,
    width=32,
    output_type="np",
    ip_adapter_image=Image.open(tiny_world / "prompt.png"),
  ).images
  out = tmp_path / "grid.png"
  argv = [
    "--pretrained",
    str(tiny_world / "sd"),
    "--prompt",
    "a red circle",
    "--negative_prompt",
    "green",
    "--num_inference_steps",
    "4",
    "--num_samples",
    "2",
    "--height",
    "32",
    "--width",
    "32",
    "--latents",
    str(tiny_world / "latents.npy"),
    "--image_encoder",
    str(tiny_world / "adapter" / "image_encoder"),
    "--ip_adapter",
    str(tiny_world / "adapter" / "ip-adapter.safetensors"),
    "--image",
    str(tiny_world / "prompt.png"),
    "--scale",
    "0.6",
    "--scheduler",
    name,
    "--out",
    str(out),
    "--save_array",
    str(tmp_path / "out.npy"),
  ]
  assert sample_main(argv) == 0
  err = float(np.abs(np.load(tmp_path / "out.npy") - expected).max())
  print(f"{name} with an image prompt: max abs image difference {err:.1e}")
  assert err <= 1e-4


def test_the_folder_config_names_the_default_sampler():
  from ipadapter_jax.cli.sample import SAMPLER_NAMES
  from ipadapter_jax.diffusion.samplers import SAMPLERS, default_sampler

  assert sorted(SAMPLER_NAMES) == sorted(SAMPLERS)
  assert default_sampler({"_class_name": "EulerDiscreteScheduler"}) == "euler"
  assert (
    default_sampler({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True})
    == "dpmpp_2m_karras"
  )
  assert default_sampler({"_class_name": "DDIMScheduler"}) == "ddim"
  assert default_sampler({"_class_name": "UniPCMultistepScheduler"}) == "unipc"
  assert default_sampler({"_class_name": "PNDMScheduler"}) == "ddim"  # not implemented here


@pytest.mark.parametrize(
  "name,cls", [("euler_a", EulerAncestralDiscreteScheduler), ("ddpm", DDPMScheduler)]
)
def test_ancestral_sampling_with_the_same_noise_matches_diffusers(tiny_world, name, cls):
  """Ancestral samplers with an image prompt, given the noise diffusers' steps draw."""
  from diffusers import StableDiffusionPipeline
  from PIL import Image

  from ipadapter_jax.generation.pipeline import IPAdapterPipeline
  from ipadapter_jax.weights import load_stable_diffusion

  pipe = StableDiffusionPipeline.from_pretrained(tiny_world / "sd")
  pipe.scheduler = cls.from_config(pipe.scheduler.config)
  pipe.load_ip_adapter(
    str(tiny_world / "adapter"),
    subfolder="",
    weight_name="ip-adapter.safetensors",
    image_encoder_folder="image_encoder",
  )
  pipe.set_ip_adapter_scale(0.6)
  latents = np.load(tiny_world / "latents.npy")
  image = Image.open(tiny_world / "prompt.png")
  request = dict(
    negative_prompt="green", num_inference_steps=4, guidance_scale=7.5, height=32, width=32
  )
  expected = pipe(
    "a red circle",
    num_images_per_prompt=2,
    latents=torch.from_numpy(latents),
    output_type="np",
    ip_adapter_image=image,
    generator=torch.Generator().manual_seed(5),
    **request,
  ).images
  pipe.scheduler.set_timesteps(4)
  noise = _step_noise(pipe.scheduler, latents.shape, seed=5)
  ours = IPAdapterPipeline(
    load_stable_diffusion(
      str(tiny_world / "sd"),
      image_encoder=str(tiny_world / "adapter" / "image_encoder"),
      ip_adapter=str(tiny_world / "adapter" / "ip-adapter.safetensors"),
    ),
    scheduler=name,
  )
  actual = ours(
    "a red circle",
    image,
    scale=0.6,
    num_samples=2,
    latents=latents,
    step_noise=noise,
    output_type="np",
    **request,
  ).images
  err = float(np.abs(actual - expected).max())
  print(f"{name} with an image prompt and diffusers' noise: max abs image difference {err:.1e}")
  assert err <= 1e-4
  # Without the noise fed in, the seed's own noise gives another image.
  assert (
    float(
      np.abs(
        ours(
          "a red circle",
          image,
          scale=0.6,
          num_samples=2,
          latents=latents,
          output_type="np",
          **request,
        ).images
        - actual
      ).max()
    )
    > 1e-3
  )


# Img2img and inpainting: runs that start mid-schedule.
STRENGTH_CONFIGS = ["sd", "sd, v-prediction, trailing"]


def _diffusers_start(cls, config, extra, steps, strength):
  """A scheduler set up as diffusers' img2img pipeline sets it up for `strength`: the run's
  timesteps and its begin index."""
  scheduler = cls.from_config(DDIMScheduler(**config).config, **extra)
  scheduler.set_timesteps(steps)
  init_timestep = min(int(steps * strength), steps)
  t_start = max(steps - init_timestep, 0)
  timesteps = scheduler.timesteps[t_start * scheduler.order :]
  if hasattr(scheduler, "set_begin_index"):
    scheduler.set_begin_index(t_start * scheduler.order)
  return scheduler, timesteps, t_start


def _img2img_theirs(cls, config, extra, steps, strength, x0, noise, seed=0):
  scheduler, timesteps, t_start = _diffusers_start(cls, config, extra, steps, strength)
  x = scheduler.add_noise(
    torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1].repeat(x0.shape[0])
  )
  generator = torch.Generator().manual_seed(seed)
  noisy = "generator" in scheduler.step.__code__.co_varnames
  for t in timesteps:
    out = _model(scheduler.scale_model_input(x, t), t.float(), torch)
    x = scheduler.step(out, t, x, **({"generator": generator} if noisy else {})).prev_sample
  return scheduler, timesteps, t_start, x.numpy()


def _img2img_ours(sampler, steps):
  """The loop from a traced first step, compiled once per sampler and number of steps."""
  traced = Tables(*(jnp.asarray(a) for a in sampler.tables(steps)))

  @jax.jit
  def run(start, x0, noise, step_noise):
    def body(i, carry):
      x, state = carry
      t = traced.timesteps[i].astype(jnp.float32)
      out = _model(sampler.scale_model_input(x, i, traced), t, jnp)
      return sampler.advance(out, i, x, state, traced, noise=step_noise[i], start=start)

    x = sampler.add_noise(x0, noise, start, traced)
    return jax.lax.fori_loop(start, steps, body, (x, sampler.init_state(x)))[0]

  return run


def _ours_sampler(name, config):
  _, ours_cls, extra = SAMPLERS[name]
  return ours_cls.from_diffusers(dict(DDIMScheduler(**CONFIGS[config]).config), **extra)


@pytest.mark.parametrize("config", STRENGTH_CONFIGS)
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_runs_from_a_strength_match_diffusers_img2img(config, name):
  """From `first_step`, with the noise added at that step as diffusers' img2img adds it; one
  compiled loop serves both strengths."""
  steps = 10
  theirs_cls, _, extra = SAMPLERS[name]
  rng = np.random.default_rng(3)
  x0, noise = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(2))
  sampler = _ours_sampler(name, config)
  run = _img2img_ours(sampler, steps)
  for strength in (0.3, 0.75):
    scheduler, timesteps, t_start, expected = _img2img_theirs(
      theirs_cls, CONFIGS[config], extra, steps, strength, x0, noise
    )
    start = first_step(steps, strength)
    assert start == t_start
    step_noise = np.zeros((steps,) + x0.shape, np.float32)
    if sampler.needs_noise:
      step_noise[start:] = _step_noise(scheduler, x0.shape, timesteps=timesteps)
    actual = np.asarray(run(jnp.int32(start), x0, noise, step_noise))
    err = float(np.abs(actual - expected).max())
    print(
      f"{name}, {config}, strength {strength} (from step {start}): max abs difference {err:.1e}"
    )
    assert err <= 1e-5 * max(1.0, float(np.abs(expected).max()))
  assert run._cache_size() == 1  # the first step is traced: no recompilation per strength


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_add_noise_mid_run_matches_diffusers(name):
  """add_noise at the run's first step (img2img) and after some steps, where diffusers'
  inpainting pipeline re-noises the known region at the next step's timestep."""
  steps, strength, done = 10, 0.75, 3
  theirs_cls, _, extra = SAMPLERS[name]
  config = "sd, v-prediction, trailing"
  rng = np.random.default_rng(4)
  x0, noise, x = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(3))
  scheduler, timesteps, start = _diffusers_start(
    theirs_cls, CONFIGS[config], extra, steps, strength
  )
  sampler = _ours_sampler(name, config)
  tables = Tables(*(jnp.asarray(a) for a in sampler.tables(steps)))
  add = jax.jit(lambda i: sampler.add_noise(x0, noise, i, tables))
  x0_t, noise_t = torch.from_numpy(x0), torch.from_numpy(noise)
  checks = [(start, scheduler.add_noise(x0_t, noise_t, timesteps[:1].repeat(2)))]
  generator = torch.Generator().manual_seed(0)
  noisy = "generator" in scheduler.step.__code__.co_varnames
  x = torch.from_numpy(x)
  for i, t in enumerate(timesteps[:done]):
    out = _model(scheduler.scale_model_input(x, t), t.float(), torch)
    x = scheduler.step(out, t, x, **({"generator": generator} if noisy else {})).prev_sample
    checks.append((start + i + 1, scheduler.add_noise(x0_t, noise_t, timesteps[i + 1 : i + 2])))
  for i, expected in checks:
    err = float(np.abs(np.asarray(add(jnp.int32(i))) - expected.numpy()).max())
    print(f"{name}, add_noise at step {i}: max abs difference {err:.1e}")
    assert err <= 1e-5 * max(1.0, float(expected.abs().max()))
