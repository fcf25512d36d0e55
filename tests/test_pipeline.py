"""End to end against diffusers: the same folder, adapter, latents and settings give the same
images."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ipadapter_jax.cli.sample import main as sample_main
from ipadapter_jax.generation.pipeline import IPAdapterPipeline
from ipadapter_jax.tokenizer import write_word_tokenizer
from ipadapter_jax.weights import load_stable_diffusion
from tests import torch_reference as ref

PROMPT, NEGATIVE = "a red circle on a blue background", "green"
H = W = 32  # latents 16x16 with the tiny VAE's factor 2


@pytest.fixture(scope="module")
def world(tiny_world):
  return tiny_world


def _diffusers_images(world, scale, guidance, with_adapter=True):
  pipe = StableDiffusionPipeline.from_pretrained(world / "sd")
  kw = {}
  if with_adapter:
    pipe.load_ip_adapter(
      str(world / "adapter"),
      subfolder="",
      weight_name="ip-adapter.safetensors",
      image_encoder_folder="image_encoder",
    )
    pipe.set_ip_adapter_scale(scale)
    kw["ip_adapter_image"] = Image.open(world / "prompt.png")
  latents = torch.from_numpy(np.load(world / "latents.npy"))
  return pipe(
    PROMPT,
    negative_prompt=NEGATIVE,
    num_inference_steps=10,
    guidance_scale=guidance,
    num_images_per_prompt=2,
    latents=latents,
    height=H,
    width=W,
    output_type="np",
    **kw,
  ).images


def _sample_py(world, tmp_path, scale, guidance, with_adapter=True):
  out = tmp_path / f"grid_{scale}_{guidance}.png"
  argv = [
    "--pretrained",
    str(world / "sd"),
    "--prompt",
    PROMPT,
    "--negative_prompt",
    NEGATIVE,
    "--guidance_scale",
    str(guidance),
    "--num_inference_steps",
    "10",
    "--num_samples",
    "2",
    "--height",
    str(H),
    "--width",
    str(W),
    "--latents",
    str(world / "latents.npy"),
    "--out",
    str(out),
    "--save_array",
    str(out.with_suffix(".npy")),
  ]
  if with_adapter:
    argv += [
      "--image_encoder",
      str(world / "adapter" / "image_encoder"),
      "--ip_adapter",
      str(world / "adapter" / "ip-adapter.safetensors"),
      "--image",
      str(world / "prompt.png"),
      "--scale",
      str(scale),
    ]
  assert sample_main(argv) == 0
  assert out.exists() and json.loads(out.with_suffix(".json").read_text())["scale"] == (
    [scale] if with_adapter else []
  )
  return np.load(out.with_suffix(".npy"))


@pytest.mark.parametrize("scale,guidance", [(0.6, 7.5), (0.6, 1.0)])
def test_sample_py_matches_diffusers(world, tmp_path, scale, guidance):
  expected = _diffusers_images(world, scale, guidance)
  actual = _sample_py(world, tmp_path, scale, guidance)
  assert actual.shape == expected.shape == (2, H, W, 3) and actual.dtype == np.float32
  err = float(np.abs(actual - expected).max())
  print(f"scale {scale}, guidance {guidance}: max abs image difference {err:.1e}")
  assert err <= 1e-5  # float32, measured 2.6e-6 (guidance 7.5) and 8.3e-7 (guidance 1.0)


def test_scale_zero_matches_diffusers_without_adapter(world, tmp_path):
  expected = _diffusers_images(world, 0.0, 7.5, with_adapter=False)
  actual = _sample_py(world, tmp_path, 0.0, 7.5)
  err = float(np.abs(actual - expected).max())
  print(f"scale 0 against diffusers without the adapter: max abs image difference {err:.1e}")
  assert err <= 1e-5  # float32, measured 2.3e-6
  assert float(np.abs(actual - _diffusers_images(world, 0.6, 7.5)).max()) > 1e-2


def test_new_scale_prompt_or_seed_do_not_recompile(world):
  models = load_stable_diffusion(
    str(world / "sd"),
    image_encoder=str(world / "adapter" / "image_encoder"),
    ip_adapter=str(world / "adapter" / "ip-adapter.safetensors"),
  )
  pipe = IPAdapterPipeline(models)
  image = Image.open(world / "prompt.png")
  request = dict(num_inference_steps=3, num_samples=2, height=H, width=W, output_type="np")
  first = pipe("a red circle", image, scale=1.0, seed=0, **request).images
  compiled = pipe.cache_size()  # jit's cache is shared with earlier pipelines of the session
  second = pipe("a blue square", image, scale=0.3, seed=1, guidance_scale=5.0, **request).images
  assert pipe.cache_size() == compiled
  # A float is expanded to one value per layer before tracing: a per-layer vector is no new shape.
  third = pipe("a blue square", image, scale=np.linspace(0, 1, 11), seed=1, **request).images
  pipe("a blue square", image, scale={"up": 0.5}, seed=2, **request)
  assert pipe.cache_size() == compiled
  assert not np.allclose(first, second) and not np.allclose(second, third)


def test_a_batch_of_requests_equals_one_request_at_a_time(world):
  models = load_stable_diffusion(
    str(world / "sd"),
    image_encoder=str(world / "adapter" / "image_encoder"),
    ip_adapter=str(world / "adapter" / "ip-adapter.safetensors"),
  )
  pipe = IPAdapterPipeline(models)
  rng = np.random.default_rng(1)
  images = [
    Image.open(world / "prompt.png"),
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)),
  ]
  prompts = ["a red circle", "a blue square on a green background"]
  latents = rng.standard_normal((4, 4, H // 2, W // 2)).astype(np.float32)
  request = dict(
    num_inference_steps=3, num_samples=2, height=H, width=W, scale=0.7, output_type="np"
  )
  batched = pipe(prompts, images, latents=latents, **request).images
  one_by_one = np.concatenate(
    [
      pipe(prompts[i], images[i], latents=latents[2 * i : 2 * i + 2], **request).images
      for i in range(2)
    ]
  )
  ref.assert_close(batched, one_by_one)
  shared = pipe(prompts, images[0], latents=latents, **request).images  # one image for both
  ref.assert_close(shared[:2], batched[:2])
  with pytest.raises(ValueError, match="2 prompts and 3 images"):
    pipe(prompts, images + images[:1], **request)


def test_bad_input_ends_with_one_line(world, tmp_path, capsys):
  base = ["--pretrained", str(world / "sd"), "--out", str(tmp_path / "g.png")]
  cases = [
    (
      ["--image", str(tmp_path / "missing.png"), "--ip_adapter", "x", "--image_encoder", "y"],
      "no such file",
    ),
    (["--height", "33", "--num_inference_steps", "1"], "divisible by 2"),
    (["--pretrained", str(tmp_path / "nothing")], "no such folder"),
  ]
  (tmp_path / "broken.png").write_bytes(b"not an image")
  cases.append(
    (
      [
        "--image",
        str(tmp_path / "broken.png"),
        "--image_encoder",
        str(world / "adapter" / "image_encoder"),
        "--ip_adapter",
        str(world / "adapter" / "ip-adapter.safetensors"),
      ],
      "not a readable image",
    )
  )
  for extra, message in cases:
    assert sample_main(base + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1], err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("negative", ["green", None])
def test_sdxl_text_to_image_matches_diffusers(tmp_path, negative):
  from diffusers import StableDiffusionXLPipeline
  from transformers import CLIPTextModelWithProjection

  write_word_tokenizer(str(tmp_path / "words"), ref.WORDS, model_max_length=16)
  tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "words"))
  text_2 = CLIPTextConfig(
    **dict(ref.TEXT_LIKE, hidden_size=8, num_attention_heads=2, projection_dim=ref.SDXL_POOLED_DIM)
  )
  pipe = StableDiffusionXLPipeline(
    vae=ref.randomize_(AutoencoderKL(**ref.VAE_LIKE), 0),
    text_encoder=ref.randomize_(CLIPTextModel(CLIPTextConfig(**ref.TEXT_LIKE)), 1),
    text_encoder_2=ref.randomize_(CLIPTextModelWithProjection(text_2), 2),
    tokenizer=tokenizer,
    tokenizer_2=tokenizer,
    unet=ref.tiny_unet(dict(ref.SDXL_LIKE, cross_attention_dim=40), 3),
    scheduler=DDIMScheduler(
      beta_start=0.00085,
      beta_end=0.012,
      beta_schedule="scaled_linear",
      clip_sample=False,
      set_alpha_to_one=False,
      steps_offset=1,
    ),
  )
  pipe.save_pretrained(tmp_path / "xl")
  latents = np.random.default_rng(1).standard_normal((1, 4, H // 2, W // 2)).astype(np.float32)
  expected = pipe(
    PROMPT,
    negative_prompt=negative,
    num_inference_steps=5,
    guidance_scale=5.0,
    latents=torch.from_numpy(latents),
    height=H,
    width=W,
    output_type="np",
  ).images
  ours = IPAdapterPipeline(load_stable_diffusion(str(tmp_path / "xl")))
  actual = ours(
    PROMPT,
    negative_prompt=negative,
    num_inference_steps=5,
    guidance_scale=5.0,
    latents=latents,
    height=H,
    width=W,
    output_type="np",
  ).images
  err = float(np.abs(actual - expected).max())
  print(f"SDXL, negative {negative!r}: max abs image difference {err:.1e}")
  assert err <= 1e-5  # float32, measured 2.2e-6 ("green") and 2.1e-6 (None)
  # sample.py without --negative_prompt is diffusers without negative_prompt (zero embeddings).
  np.save(tmp_path / "latents.npy", latents)
  out = tmp_path / "xl.png"
  argv = [
    "--pretrained",
    str(tmp_path / "xl"),
    "--prompt",
    PROMPT,
    "--guidance_scale",
    "5.0",
    "--num_inference_steps",
    "5",
    "--num_samples",
    "1",
    "--height",
    str(H),
    "--width",
    str(W),
    "--latents",
    str(tmp_path / "latents.npy"),
    "--out",
    str(out),
    "--save_array",
    str(out.with_suffix(".npy")),
  ]
  assert sample_main(argv + ([] if negative is None else ["--negative_prompt", negative])) == 0
  err = float(np.abs(np.load(out.with_suffix(".npy")) - expected).max())
  print(f"SDXL through sample.py, negative {negative!r}: max abs image difference {err:.1e}")
  assert err <= 1e-5  # the same program as above: measured 2.2e-6 and 2.1e-6


def test_plus_adapter_sampling_matches_diffusers(world, tmp_path):
  """Plus: hidden_states[-2] features, mean-grey pixels for the unconditional image tokens."""
  from safetensors.torch import save_file

  from ipadapter_jax.weights import load_stable_diffusion as load

  torch_unet = StableDiffusionPipeline.from_pretrained(world / "sd").unet
  official = ref.official_adapter(
    torch_unet, 16, ref.VISION_LIKE["hidden_size"], seed=9, kind="plus", resampler_dim=64, heads=1
  )
  folder = tmp_path / "plus"
  folder.mkdir()
  save_file(
    {f"{s}.{k}": v for s, d in official.items() for k, v in d.items()},
    str(folder / "ip-adapter-plus.safetensors"),
  )
  pipe = StableDiffusionPipeline.from_pretrained(world / "sd")
  pipe.load_ip_adapter(
    str(folder),
    subfolder="",
    weight_name="ip-adapter-plus.safetensors",
    image_encoder_folder=str(world / "adapter" / "image_encoder"),
  )
  pipe.set_ip_adapter_scale(0.6)
  image = Image.open(world / "prompt.png")
  latents = np.load(world / "latents.npy")
  expected = pipe(
    PROMPT,
    negative_prompt=NEGATIVE,
    num_inference_steps=4,
    guidance_scale=7.5,
    num_images_per_prompt=2,
    latents=torch.from_numpy(latents),
    height=H,
    width=W,
    output_type="np",
    ip_adapter_image=image,
  ).images
  ours = IPAdapterPipeline(
    load(
      str(world / "sd"),
      image_encoder=str(world / "adapter" / "image_encoder"),
      ip_adapter=str(folder / "ip-adapter-plus.safetensors"),
    )
  )
  actual = ours(
    PROMPT,
    image,
    negative_prompt=NEGATIVE,
    scale=0.6,
    num_inference_steps=4,
    num_samples=2,
    latents=latents,
    height=H,
    width=W,
    output_type="np",
  ).images
  err = float(np.abs(actual - expected).max())
  print(f"Plus adapter: max abs image difference {err:.1e}")
  assert err <= 2e-5  # float32, measured 4.0e-6
