"""A call's arguments -> the static Plan and the traced Inputs, on the host (nothing compiles)."""

import jax
import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.diffusion.samplers import make_sampler
from ipadapter_jax.generation.request import Inputs, Plan, Request, plan_generation
from ipadapter_jax.tokenizer import tokenize
from ipadapter_jax.weights import load_stable_diffusion

H = W = 32  # the tiny VAE halves each side: 16x16x4 latents


@pytest.fixture(scope="module")
def models(tiny_world):
  return load_stable_diffusion(
    str(tiny_world / "sd"),
    image_encoder=str(tiny_world / "adapter" / "image_encoder"),
    ip_adapter=str(tiny_world / "adapter" / "ip-adapter.safetensors"),
  )


@pytest.fixture(scope="module")
def prompt_image(tiny_world):
  return Image.open(tiny_world / "prompt.png")


def _plan(models, **request):
  sampler = make_sampler("ddim", models.scheduler_config)
  return plan_generation(models, sampler, Request(**dict(dict(height=H, width=W), **request)))


def test_values_change_the_inputs_but_never_the_plan(models, prompt_image):
  """Whatever may change without recompiling is a leaf of Inputs; the Plan (the jit cache key)
  and the pytree's structure stay equal."""
  a_plan, a = _plan(
    models,
    prompt="a red circle",
    image=prompt_image,
    scale=0.3,
    seed=0,
    guidance_scale=5.0,
    num_inference_steps=4,
  )
  b_plan, b = _plan(
    models,
    prompt="a blue square",
    image=prompt_image,
    scale=0.9,
    seed=1,
    guidance_scale=7.5,
    num_inference_steps=4,
  )
  assert isinstance(a, Inputs) and isinstance(a_plan, Plan)
  assert a_plan == b_plan and hash(a_plan) == hash(b_plan)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for name in ("ids", "latents", "guidance_scale"):
    assert not np.array_equal(getattr(a, name), getattr(b, name)), name
  assert not np.array_equal(a.adapters[0].scale, b.adapters[0].scale)


def test_rows_are_all_negatives_then_all_positives(models, prompt_image):
  plan, inputs = _plan(
    models,
    prompt=["a red circle", "a blue square"],
    image=prompt_image,
    negative_prompt="green",
    num_samples=3,
    num_inference_steps=4,
  )
  expected = tokenize(models.tokenizer, ["green", "green", "a red circle", "a blue square"])
  np.testing.assert_array_equal(inputs.ids, expected)
  assert inputs.latents.shape == (2 * 3, H // 2, W // 2, 4)
  # one image shared by both requests: the shorthand gives each request its own pixels row
  assert inputs.adapters[0].pixels.shape[:2] == (2, 1)
  np.testing.assert_array_equal(inputs.adapters[0].pixels[0], inputs.adapters[0].pixels[1])
  assert plan.num_samples == 3 and plan.guidance and not plan.stochastic
  assert inputs.ids_2 is None and inputs.time_ids is None  # SD1.5: no SDXL conditioning


def test_given_noise_is_read_in_diffusers_layout(models):
  rng = np.random.default_rng(0)
  latents_NCHW = rng.standard_normal((2, 4, H // 2, W // 2)).astype(np.float32)
  noise = rng.standard_normal((3, 2, 4, H // 2, W // 2)).astype(np.float32)
  _, inputs = _plan(
    models, num_samples=2, latents=latents_NCHW, step_noise=noise, num_inference_steps=3
  )
  np.testing.assert_array_equal(inputs.latents, latents_NCHW.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(inputs.step_noise, noise.transpose(0, 1, 3, 4, 2))
  with pytest.raises(ValueError, match=r"initial latents have shape \[1, 4, 16, 16\]"):
    _plan(models, num_samples=2, latents=latents_NCHW[:1])
  with pytest.raises(ValueError, match=r"step_noise has shape .* expected \[4, 2, 4, 16, 16\]"):
    _plan(models, num_samples=2, step_noise=noise, num_inference_steps=4)


def test_the_plan_follows_the_request(models, prompt_image):
  plan, inputs = _plan(models, guidance_scale=1.0, eta=0.5, num_inference_steps=5)
  assert plan.task == "text2img" and not plan.guidance and plan.stochastic
  assert plan.adapters == () and inputs.adapters == () and inputs.start == 0
  init = Image.new("RGB", (W, H), (200, 30, 30))
  plan, inputs = _plan(models, init_image=init, num_inference_steps=10)
  # diffusers' default strength 0.8 skips the first 10 - int(10 * 0.8) = 2 steps
  assert plan.task == "img2img" and int(inputs.start) == 2
  assert inputs.init.latent_mask is None
  plan, inputs = _plan(
    models, init_image=init, mask_image=Image.new("L", (W, H), 255), num_inference_steps=10
  )
  assert plan.task == "inpaint" and int(inputs.start) == 0  # strength 1.0
  assert inputs.init.latent_mask.shape == (1, H // 2, W // 2, 1)
  assert bool(inputs.init.from_noise)


def test_output_size_comes_from_the_init_image_rounded_down(models):
  plan, inputs = _plan(
    models, init_image=Image.new("RGB", (41, 41)), height=None, width=None, num_inference_steps=4
  )
  assert inputs.init.pixels.shape == (1, 40, 40, 3)  # 41 rounded down to the VAE's factor 2
  assert inputs.latents.shape == (1, 20, 20, 4)


@pytest.mark.parametrize(
  "request_kw,error,message",
  [
    (dict(colour="red"), TypeError, "colour"),
    (dict(num_samples=0), ValueError, "num_samples must be at least 1"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be finite"),
    (dict(height=33), ValueError, "divisible by 2"),
    (dict(prompt=["a", "b"], image=["x", "y", "z"]), ValueError, "2 prompts and 3 images"),
    (dict(mask_image=Image.new("L", (W, H))), ValueError, "a mask_image needs an init_image"),
    (dict(image="not an image"), ValueError, "not a usable image"),
  ],
)
def test_bad_requests_are_refused_in_one_line(models, request_kw, error, message):
  with pytest.raises(error, match=message) as e:
    _plan(models, num_inference_steps=4, **request_kw)
  assert "\n" not in str(e.value)
