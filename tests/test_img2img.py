"""img2img and inpainting against diffusers' pipelines: the same folder, adapter, init image,
mask and noise (the VAE posterior's too) give the same images."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from ipadapter_jax.generation.pipeline import IPAdapterPipeline
from ipadapter_jax.generation.structure import inpaint_mask, nearest_downsample, vae_image
from ipadapter_jax.weights import load_stable_diffusion
from tests import torch_reference as ref

PROMPT, NEGATIVE = "a red circle on a blue background", "green"
H = W = 32  # latents 16x16 with the tiny VAE's factor 2
LATENT = (1, 4, H // 2, W // 2)
STEPS = 6


def _init_image():
  rng = np.random.default_rng(7)
  base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # smooth enough to resize sensibly
  return Image.fromarray(base).resize((W, H), Image.BILINEAR)


def _mask():
  mask = np.zeros((H + 8, W + 8), np.uint8)  # another size than the image: resized as diffusers
  mask[:, : (W + 8) // 2] = 255
  return Image.fromarray(mask)


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
  """The tiny SD world, plus a copy whose UNet is an inpainting one (9 input channels) with an
  adapter of its own."""
  inpaint = tmp_path_factory.mktemp("inpaint")
  shutil.copytree(tiny_world / "sd", inpaint / "sd")
  unet = ref.tiny_unet(dict(ref.SD15_LIKE, in_channels=9), 11)
  shutil.rmtree(inpaint / "sd" / "unet")
  unet.save_pretrained(inpaint / "sd" / "unet")
  ref.save_official(
    ref.official_adapter(unet, 4, ref.VISION_LIKE["projection_dim"], seed=12),
    inpaint / "ip-adapter.safetensors",
  )
  return tiny_world, inpaint


def _adapter_paths(world, inpaint_unet=False):
  tiny, inpaint = world
  folder = inpaint if inpaint_unet else tiny / "adapter"
  return (
    (inpaint / "sd" if inpaint_unet else tiny / "sd"),
    folder,
    tiny / "adapter" / "image_encoder",
  )


def _theirs(cls, world, *, inpaint_unet=False, num_samples=2, feed=None, **kw):
  """diffusers' images, and the noise its generator drew, in the order it drew it (or the
  arrays of `feed` in its place, in that order)."""
  sd, adapter, encoder = _adapter_paths(world, inpaint_unet)
  pipe = cls.from_pretrained(sd)
  pipe.load_ip_adapter(
    str(adapter),
    subfolder="",
    weight_name="ip-adapter.safetensors",
    image_encoder_folder=str(encoder),
  )
  pipe.set_ip_adapter_scale(0.6)
  draws = []
  original = torch.randn

  def recording_randn(*args, **kwargs):
    out = original(*args, **kwargs)
    if feed is not None:
      given = feed.pop(0)
      assert tuple(given.shape) == tuple(out.shape), (given.shape, out.shape)
      out = torch.from_numpy(np.ascontiguousarray(given))
    draws.append(out.numpy().copy())
    return out

  torch.randn = recording_randn
  try:
    images = pipe(
      PROMPT,
      negative_prompt=NEGATIVE,
      num_inference_steps=STEPS,
      guidance_scale=7.5,
      num_images_per_prompt=num_samples,
      ip_adapter_image=Image.open(world[0] / "prompt.png"),
      generator=torch.Generator().manual_seed(0),
      output_type="np",
      **kw,
    ).images
  finally:
    torch.randn = original
  return images, draws


def _ours(world, *, inpaint_unet=False, num_samples=2, **kw):
  sd, adapter, encoder = _adapter_paths(world, inpaint_unet)
  pipe = IPAdapterPipeline(
    load_stable_diffusion(
      str(sd), image_encoder=str(encoder), ip_adapter=str(adapter / "ip-adapter.safetensors")
    )
  )
  image = Image.open(world[0] / "prompt.png")
  run = lambda **more: (
    pipe(
      PROMPT,
      image,
      negative_prompt=NEGATIVE,
      scale=0.6,
      num_inference_steps=STEPS,
      num_samples=num_samples,
      output_type="np",
      **kw,
      **more,
    ).images
  )
  return pipe, run


def _report(name, actual, expected):
  err = float(np.abs(actual - expected).max())
  print(f"{name}: max abs image difference {err:.1e}")
  assert actual.shape == expected.shape
  assert err <= 1e-4  # float32 images


def test_img2img_at_two_strengths_matches_diffusers(world):
  init = _init_image()
  pipe, run = _ours(world, init_image=init)
  compiled = pipe.cache_size()  # (the count is shared by every pipeline in the process)
  for strength in (0.5, 0.8):
    expected, (posterior, noise) = _theirs(
      StableDiffusionImg2ImgPipeline, world, image=init, strength=strength
    )
    actual = run(strength=strength, latents=noise, posterior_noise={"init_image": posterior})
    _report(f"img2img, strength {strength}", actual, expected)
  assert pipe.cache_size() == compiled + 1  # the strength is traced: one program for both


def test_img2img_default_strength_and_size_are_diffusers(world):
  """No strength: diffusers' 0.8; no height/width: the init image's size."""
  init = _init_image()
  expected, (posterior, noise) = _theirs(
    StableDiffusionImg2ImgPipeline, world, image=init, num_samples=1
  )
  _, run = _ours(world, num_samples=1, init_image=init)
  _report(
    "img2img, defaults", run(latents=noise, posterior_noise={"init_image": posterior}), expected
  )


def test_inpainting_with_a_regular_unet_matches_diffusers(world):
  init, mask = _init_image(), _mask()
  expected, (posterior, noise, masked_posterior) = _theirs(
    StableDiffusionInpaintPipeline, world, image=init, mask_image=mask, height=H, width=W
  )
  _, run = _ours(world, init_image=init, mask_image=mask, height=H, width=W)
  actual = run(
    latents=noise, posterior_noise={"init_image": posterior, "masked_image": masked_posterior}
  )
  _report("inpainting, 4-channel UNet, strength 1", actual, expected)


def test_inpainting_below_full_strength_matches_diffusers(world):
  """strength < 1 without latents=: the init image's latents noised to the first step. Our
  seed's noise is fed to diffusers in the order its generator would draw."""
  init, mask = _init_image(), _mask()
  pipe, run = _ours(world, init_image=init, mask_image=mask, strength=0.7, height=H, width=W)
  _, inputs = pipe.prepare(
    PROMPT,
    Image.open(world[0] / "prompt.png"),
    init_image=init,
    mask_image=mask,
    strength=0.7,
    height=H,
    width=W,
    num_samples=2,
    num_inference_steps=STEPS,
  )
  nchw = lambda array: np.asarray(array).transpose(0, 3, 1, 2)
  expected, _ = _theirs(
    StableDiffusionInpaintPipeline,
    world,
    image=init,
    mask_image=mask,
    strength=0.7,
    height=H,
    width=W,
    feed=[nchw(inputs.init.posterior_noise), nchw(inputs.latents), nchw(inputs.init.masked_noise)],
  )
  _report("inpainting, 4-channel UNet, strength 0.7", run(), expected)


def test_inpainting_with_an_inpainting_unet_matches_diffusers(world):
  init, mask = _init_image(), _mask()
  expected, (noise, masked_posterior) = _theirs(
    StableDiffusionInpaintPipeline,
    world,
    inpaint_unet=True,
    image=init,
    mask_image=mask,
    height=H,
    width=W,
  )
  _, run = _ours(world, inpaint_unet=True, init_image=init, mask_image=mask, height=H, width=W)
  actual = run(latents=noise, posterior_noise={"masked_image": masked_posterior})
  _report("inpainting, 9-channel UNet", actual, expected)


def test_inpainting_from_given_latents_is_diffusers_latents_argument(world):
  """With `latents=`, diffusers starts from them (times the initial sigma) whatever the
  strength, and blends the known part with them as the noise."""
  init, mask = _init_image(), _mask()
  latents = np.random.default_rng(3).standard_normal((2,) + LATENT[1:]).astype(np.float32)
  expected, (posterior, masked_posterior) = _theirs(
    StableDiffusionInpaintPipeline,
    world,
    image=init,
    mask_image=mask,
    strength=0.6,
    height=H,
    width=W,
    latents=torch.from_numpy(latents),
  )
  _, run = _ours(world, init_image=init, mask_image=mask, strength=0.6, height=H, width=W)
  actual = run(
    latents=latents, posterior_noise={"init_image": posterior, "masked_image": masked_posterior}
  )
  _report("inpainting from latents=", actual, expected)


def test_preprocessing_equals_diffusers_processors():
  from diffusers.image_processor import VaeImageProcessor

  image, mask = _init_image().resize((37, 37)), _mask()
  theirs = VaeImageProcessor(vae_scale_factor=2).preprocess(image, height=H, width=W)
  np.testing.assert_array_equal(vae_image(image, H, W), theirs[0].numpy().transpose(1, 2, 0))
  masks = VaeImageProcessor(
    vae_scale_factor=2, do_normalize=False, do_binarize=True, do_convert_grayscale=True
  ).preprocess(mask, height=H, width=W)
  ours = inpaint_mask(mask, H, W)
  np.testing.assert_array_equal(ours, masks[0, 0].numpy())
  for size in [(16, 16), (11, 7)]:
    down = torch.nn.functional.interpolate(masks, size=size)[0, 0].numpy()
    np.testing.assert_array_equal(nearest_downsample(ours, *size), down)


def test_bad_init_requests_end_with_one_line(world):
  _, run = _ours(world, num_samples=1, height=H, width=W)
  wide = _init_image().resize((2 * W, H))
  cases = [
    (dict(init_image=wide), "aspect ratio"),
    (dict(init_image=_init_image(), strength=1.5), "strength"),
    (dict(init_image=_init_image(), strength=0.05), "no denoising step"),
    (dict(mask_image=_mask()), "needs an init_image"),
    (
      dict(init_image=_init_image(), posterior_noise={"init_image": np.zeros((1, 4, 3, 3))}),
      "posterior_noise['init_image'] has shape",
    ),
  ]
  for kw, message in cases:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as info:
      run(**kw)
    assert "\n" not in str(info.value)
  _, text_only = _ours(world, inpaint_unet=True, num_samples=1, height=H, width=W)
  with pytest.raises(ValueError, match="inpainting model"):
    text_only()


def test_sample_py_img2img_and_inpainting_are_the_python_api(world, tmp_path):
  from ipadapter_jax.cli.sample import main as sample_main

  _init_image().save(tmp_path / "init.png")
  _mask().save(tmp_path / "mask.png")
  tiny = world[0]
  base = [
    "--pretrained",
    str(tiny / "sd"),
    "--prompt",
    PROMPT,
    "--negative_prompt",
    NEGATIVE,
    "--num_inference_steps",
    str(STEPS),
    "--num_samples",
    "2",
    "--seed",
    "3",
    "--image_encoder",
    str(tiny / "adapter" / "image_encoder"),
    "--ip_adapter",
    str(tiny / "adapter" / "ip-adapter.safetensors"),
    "--image",
    str(tiny / "prompt.png"),
    "--scale",
    "0.6",
    "--init_image",
    str(tmp_path / "init.png"),
  ]
  _, run = _ours(world, init_image=Image.open(tmp_path / "init.png"), seed=3)
  for case, (extra, kw) in enumerate(
    (
      (["--strength", "0.6"], dict(strength=0.6)),
      (
        ["--mask_image", str(tmp_path / "mask.png"), "--height", str(H), "--width", str(W)],
        dict(mask_image=Image.open(tmp_path / "mask.png"), height=H, width=W),
      ),
    )
  ):
    out = tmp_path / f"grid{case}.png"
    assert (
      sample_main(base + extra + ["--out", str(out), "--save_array", str(out.with_suffix(".npy"))])
      == 0
    )
    np.testing.assert_array_equal(np.load(out.with_suffix(".npy")), run(**kw))


@pytest.fixture(scope="module")
def sdxl(tiny_world, tmp_path_factory):
  """A tiny SDXL folder with a basic adapter for the test image encoder."""
  tmp = tmp_path_factory.mktemp("sdxl_init")
  unet = ref.save_tiny_sdxl(tmp)
  ref.save_official(
    ref.official_adapter(unet, 4, ref.VISION_LIKE["projection_dim"], seed=11),
    tmp / "ip-adapter.safetensors",
  )
  return tiny_world, tmp


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_sdxl_img2img_and_inpainting_match_diffusers(sdxl, task):
  """SDXL's own defaults: strength 0.3 (img2img) and 0.9999 (inpainting), guidance 5."""
  from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

  tiny, tmp = sdxl
  init, mask = _init_image(), _mask()
  cls = StableDiffusionXLImg2ImgPipeline if task == "img2img" else StableDiffusionXLInpaintPipeline
  theirs = cls.from_pretrained(tmp / "xl")
  theirs.load_ip_adapter(
    str(tmp),
    subfolder="",
    weight_name="ip-adapter.safetensors",
    image_encoder_folder=str(tiny / "adapter" / "image_encoder"),
  )
  theirs.set_ip_adapter_scale(0.6)
  ours = IPAdapterPipeline(
    load_stable_diffusion(
      str(tmp / "xl"),
      image_encoder=str(tiny / "adapter" / "image_encoder"),
      ip_adapter=str(tmp / "ip-adapter.safetensors"),
    )
  )
  prompt_image = Image.open(tiny / "prompt.png")
  request = dict(
    init_image=init, height=H, width=W, num_inference_steps=10, num_samples=1, scale=0.6
  )
  kw = dict(image=init, height=H, width=W)
  if task == "inpaint":
    request["mask_image"] = kw["mask_image"] = mask
  _, inputs = ours.prepare(
    PROMPT, prompt_image, negative_prompt=NEGATIVE, guidance_scale=5.0, **request
  )
  nchw = lambda array: np.asarray(array).transpose(0, 3, 1, 2)
  feed = [nchw(inputs.init.posterior_noise), nchw(inputs.latents)] + (
    [nchw(inputs.init.masked_noise)] if task == "inpaint" else []
  )
  original = torch.randn

  def fed(*args, **kwargs):
    out = original(*args, **kwargs)
    given = feed.pop(0)
    assert tuple(given.shape) == tuple(out.shape)
    return torch.from_numpy(np.ascontiguousarray(given))

  torch.randn = fed
  try:
    expected = theirs(
      PROMPT,
      negative_prompt=NEGATIVE,
      num_inference_steps=10,
      guidance_scale=5.0,
      ip_adapter_image=prompt_image,
      generator=torch.Generator().manual_seed(0),
      output_type="np",
      **kw,
    ).images
  finally:
    torch.randn = original
  assert not feed  # diffusers drew exactly the noise we did
  actual = ours(
    PROMPT, prompt_image, negative_prompt=NEGATIVE, guidance_scale=5.0, output_type="np", **request
  ).images
  _report(f"SDXL {task}, default strength", actual, expected)
