"""Structure control with image prompts against diffusers' pipelines: one and two ControlNets
(scales, guidance windows, guess mode) on SD1.5, and a T2I-Adapter on SDXL, image for image."""

import numpy as np
import pytest
import torch
from diffusers import (
  ControlNetModel,
  StableDiffusionControlNetPipeline,
  StableDiffusionXLAdapterPipeline,
  T2IAdapter,
  UNet2DConditionModel,
)
from PIL import Image

from ipadapter_jax.generation.pipeline import IPAdapterPipeline
from ipadapter_jax.weights import CheckpointError, load_stable_diffusion
from tests import torch_reference as ref

PROMPT, NEGATIVE = "a red circle on a blue background", "green"
H = W = 32  # latents 16x16 with the tiny VAE's factor 2
STEPS = 5


def _control_image(seed):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((W, H))


@pytest.fixture(scope="module")
def sd15(tiny_world, tmp_path_factory):
  """The tiny SD world and two ControlNets made from its UNet."""
  tmp = tmp_path_factory.mktemp("controlnets")
  unet = UNet2DConditionModel.from_pretrained(tiny_world / "sd" / "unet")
  folders = []
  for seed in (21, 22):
    net = ref.randomize_(
      ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), seed
    )
    net.save_pretrained(tmp / f"cn{seed}")
    folders.append(str(tmp / f"cn{seed}"))
  return tiny_world, folders


def _theirs_controlnet(world, folders, **kw):
  nets = [ControlNetModel.from_pretrained(f) for f in folders]
  pipe = StableDiffusionControlNetPipeline.from_pretrained(
    world / "sd", controlnet=nets if len(nets) > 1 else nets[0], safety_checker=None
  )
  pipe.load_ip_adapter(
    str(world / "adapter"),
    subfolder="",
    weight_name="ip-adapter.safetensors",
    image_encoder_folder="image_encoder",
  )
  pipe.set_ip_adapter_scale(0.6)
  latents = torch.from_numpy(np.load(world / "latents.npy"))
  return pipe(
    PROMPT,
    negative_prompt=NEGATIVE,
    num_inference_steps=STEPS,
    guidance_scale=7.5,
    num_images_per_prompt=2,
    latents=latents,
    output_type="np",
    ip_adapter_image=Image.open(world / "prompt.png"),
    **kw,
  ).images


def _ours_controlnet(world, folders):
  pipe = IPAdapterPipeline(
    load_stable_diffusion(
      str(world / "sd"),
      image_encoder=str(world / "adapter" / "image_encoder"),
      ip_adapter=str(world / "adapter" / "ip-adapter.safetensors"),
      controlnet=folders,
    )
  )
  run = lambda **kw: (
    pipe(
      PROMPT,
      Image.open(world / "prompt.png"),
      negative_prompt=NEGATIVE,
      scale=0.6,
      num_inference_steps=STEPS,
      num_samples=2,
      latents=np.load(world / "latents.npy"),
      output_type="np",
      **kw,
    ).images
  )
  return pipe, run


def _report(name, actual, expected):
  err = float(np.abs(actual - expected).max())
  print(f"{name}: max abs image difference {err:.1e}")
  assert actual.shape == expected.shape
  assert err <= 1e-4  # float32 images


def test_one_controlnet_with_an_image_prompt_matches_diffusers(sd15):
  world, folders = sd15
  image = _control_image(0)
  pipe, run = _ours_controlnet(world, folders[:1])
  compiled = pipe.cache_size()  # (the count is shared by every pipeline in the process)
  for kw in (
    dict(controlnet_conditioning_scale=0.8),
    dict(controlnet_conditioning_scale=1.3, control_guidance_start=0.2, control_guidance_end=0.7),
  ):
    expected = _theirs_controlnet(world, folders[:1], image=image, **kw)
    _report(f"one ControlNet, {kw}", run(control_images=[image], **kw), expected)
  assert pipe.cache_size() == compiled + 1  # scales and windows are traced
  expected = _theirs_controlnet(world, folders[:1], image=image, guess_mode=True)
  _report("one ControlNet, guess mode", run(control_images=[image], guess_mode=True), expected)


def test_two_controlnets_with_an_image_prompt_match_diffusers(sd15):
  world, folders = sd15
  images = [_control_image(0), _control_image(1)]
  kw = dict(
    controlnet_conditioning_scale=[0.7, 1.2],
    control_guidance_start=[0.0, 0.2],
    control_guidance_end=[1.0, 0.8],
  )
  expected = _theirs_controlnet(world, folders, image=images, **kw)
  _, run = _ours_controlnet(world, folders)
  _report("two ControlNets", run(control_images=images, **kw), expected)


def test_controlnet_requests_and_misfits_are_refused_in_one_line(sd15, tmp_path):
  world, folders = sd15
  _, run = _ours_controlnet(world, folders)
  image = _control_image(0)
  cases = [
    (dict(control_images=[image]), "1 control images for 2 ControlNets"),
    (
      dict(control_images=[image, image], controlnet_conditioning_scale=[1.0]),
      "1 values of controlnet_conditioning_scale",
    ),
    (
      dict(control_images=[image, image], control_guidance_start=0.9, control_guidance_end=0.5),
      "start 0.9 and end 0.5",
    ),
    (dict(control_images=[image, image.resize((2 * W, H))]), "aspect ratio"),
  ]
  for kw, message in cases:
    with pytest.raises(ValueError, match=message) as info:
      run(**kw)
    assert "\n" not in str(info.value)
  xl_net = ref.randomize_(
    ControlNetModel.from_unet(
      ref.tiny_unet(dict(ref.SDXL_LIKE, cross_attention_dim=40), 3),
      conditioning_embedding_out_channels=(8, 16),
    ),
    5,
  )
  xl_net.save_pretrained(tmp_path / "xl_cn")
  with pytest.raises((ValueError, CheckpointError), match="cannot condition that UNet"):
    load_stable_diffusion(str(world / "sd"), controlnet=str(tmp_path / "xl_cn"))


@pytest.fixture(scope="module")
def sdxl(tiny_world, tmp_path_factory):
  """A tiny SDXL folder with the test image encoder, a basic adapter, a ControlNet and a
  T2I-Adapter."""
  tmp = tmp_path_factory.mktemp("sdxl_t2i")
  unet = ref.save_tiny_sdxl(tmp)
  ref.save_official(
    ref.official_adapter(unet, 4, ref.VISION_LIKE["projection_dim"], seed=11),
    tmp / "ip-adapter.safetensors",
  )
  ref.randomize_(
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), 23
  ).save_pretrained(tmp / "controlnet")
  ref.randomize_(
    T2IAdapter(
      in_channels=3,
      channels=[32, 64],
      num_res_blocks=2,
      downscale_factor=4,
      adapter_type="full_adapter_xl",
    ),
    7,
  ).save_pretrained(tmp / "t2i")
  return tiny_world, tmp


def test_sdxl_t2i_adapter_with_an_image_prompt_matches_diffusers(sdxl):
  world, tmp = sdxl
  image = _control_image(3)
  latents = np.random.default_rng(1).standard_normal((1, 4, H // 2, W // 2)).astype(np.float32)
  theirs = StableDiffusionXLAdapterPipeline.from_pretrained(
    tmp / "xl", adapter=T2IAdapter.from_pretrained(tmp / "t2i")
  )
  theirs.load_ip_adapter(
    str(tmp),
    subfolder="",
    weight_name="ip-adapter.safetensors",
    image_encoder_folder=str(world / "adapter" / "image_encoder"),
  )
  theirs.set_ip_adapter_scale(0.6)
  ours = IPAdapterPipeline(
    load_stable_diffusion(
      str(tmp / "xl"),
      image_encoder=str(world / "adapter" / "image_encoder"),
      ip_adapter=str(tmp / "ip-adapter.safetensors"),
      t2i_adapter=str(tmp / "t2i"),
    )
  )
  prompt_image = Image.open(world / "prompt.png")
  compiled = ours.cache_size()  # (the count is shared by every pipeline in the process)
  for kw in (dict(), dict(adapter_conditioning_scale=0.7, adapter_conditioning_factor=0.6)):
    expected = theirs(
      PROMPT,
      image=image,
      negative_prompt=NEGATIVE,
      num_inference_steps=STEPS,
      guidance_scale=5.0,
      latents=torch.from_numpy(latents),
      output_type="np",
      ip_adapter_image=prompt_image,
      **kw,
    ).images
    actual = ours(
      PROMPT,
      prompt_image,
      adapter_image=image,
      negative_prompt=NEGATIVE,
      scale=0.6,
      num_inference_steps=STEPS,
      guidance_scale=5.0,
      latents=latents,
      output_type="np",
      **kw,
    ).images
    _report(f"SDXL T2I-Adapter, {kw or 'defaults'}", actual, expected)
  assert ours.cache_size() == compiled + 1


def test_sample_py_runs_two_controlnets_as_diffusers(sd15, tmp_path):
  from ipadapter_jax.cli.sample import main as sample_main

  world, folders = sd15
  paths = []
  for seed in (0, 1):
    _control_image(seed).save(tmp_path / f"control{seed}.png")
    paths += [
      "--controlnet",
      folders[seed],
      "--control_image",
      str(tmp_path / f"control{seed}.png"),
    ]
  expected = _theirs_controlnet(
    world,
    folders,
    image=[_control_image(0), _control_image(1)],
    controlnet_conditioning_scale=[0.7, 1.2],
    control_guidance_end=0.8,
  )
  out = tmp_path / "grid.png"
  argv = [
    "--pretrained",
    str(world / "sd"),
    "--prompt",
    PROMPT,
    "--negative_prompt",
    NEGATIVE,
    "--num_inference_steps",
    str(STEPS),
    "--num_samples",
    "2",
    "--latents",
    str(world / "latents.npy"),
    "--out",
    str(out),
    "--save_array",
    str(out.with_suffix(".npy")),
    "--image_encoder",
    str(world / "adapter" / "image_encoder"),
    "--ip_adapter",
    str(world / "adapter" / "ip-adapter.safetensors"),
    "--image",
    str(world / "prompt.png"),
    "--scale",
    "0.6",
    *paths,
    "--controlnet_conditioning_scale",
    "0.7",
    "--controlnet_conditioning_scale",
    "1.2",
    "--control_guidance_end",
    "0.8",
  ]
  assert sample_main(argv) == 0
  _report("sample.py, two ControlNets", np.load(out.with_suffix(".npy")), expected)


@pytest.mark.parametrize(
  "extra,message",
  [
    (["--control_image", "a.png"], "1 --control_image for 0 --controlnet"),
    (["--guess_mode"], "--guess_mode needs --controlnet"),
    (["--adapter_image", "a.png"], "--t2i_adapter and --adapter_image go together"),
  ],
)
def test_sample_py_refuses_bad_structure_flags_in_one_line(sd15, tmp_path, capsys, extra, message):
  from ipadapter_jax.cli.sample import main as sample_main

  world, _ = sd15
  out = tmp_path / "g.png"
  assert sample_main(["--pretrained", str(world / "sd"), "--out", str(out), *extra]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error:") and message in err[-1], err
  assert not out.exists()


def test_sdxl_controlnet_with_an_image_prompt_matches_diffusers(sdxl):
  from diffusers import StableDiffusionXLControlNetPipeline

  world, tmp = sdxl
  image = _control_image(4)
  latents = np.random.default_rng(2).standard_normal((1, 4, H // 2, W // 2)).astype(np.float32)
  theirs = StableDiffusionXLControlNetPipeline.from_pretrained(
    tmp / "xl", controlnet=ControlNetModel.from_pretrained(tmp / "controlnet")
  )
  theirs.load_ip_adapter(
    str(tmp),
    subfolder="",
    weight_name="ip-adapter.safetensors",
    image_encoder_folder=str(world / "adapter" / "image_encoder"),
  )
  theirs.set_ip_adapter_scale(0.6)
  prompt_image = Image.open(world / "prompt.png")
  kw = dict(controlnet_conditioning_scale=0.8, control_guidance_start=0.2)
  expected = theirs(
    PROMPT,
    image=image,
    negative_prompt=NEGATIVE,
    num_inference_steps=STEPS,
    guidance_scale=5.0,
    latents=torch.from_numpy(latents),
    output_type="np",
    ip_adapter_image=prompt_image,
    **kw,
  ).images
  ours = IPAdapterPipeline(
    load_stable_diffusion(
      str(tmp / "xl"),
      image_encoder=str(world / "adapter" / "image_encoder"),
      ip_adapter=str(tmp / "ip-adapter.safetensors"),
      controlnet=str(tmp / "controlnet"),
    )
  )
  actual = ours(
    PROMPT,
    prompt_image,
    control_images=[image],
    negative_prompt=NEGATIVE,
    scale=0.6,
    num_inference_steps=STEPS,
    guidance_scale=5.0,
    latents=latents,
    output_type="np",
    **kw,
  ).images
  _report("SDXL ControlNet", actual, expected)
