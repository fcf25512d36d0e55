"""Composition against diffusers, image for image: several adapters and images, masks, block scales,
presets, saved embeddings; timestep windows and negative images against a loop of diffusers'
UNet."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

from ipadapter_jax.generation import adapter_scales
from ipadapter_jax.generation.image_prompts import (
  AdapterPrompt,
  load_image_embeds,
  save_image_embeds,
)
from ipadapter_jax.generation.pipeline import IPAdapterPipeline
from ipadapter_jax.weights import load_stable_diffusion
from tests import torch_reference as ref

PROMPT, NEGATIVE = "a red circle on a blue background", "green"
H = W = 32
STEPS = 3
BASIC, PLUS = "ip-adapter.safetensors", "ip-adapter-plus.safetensors"


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
  """tiny_world plus a folder holding the basic adapter and a Plus adapter, and test images."""
  folder = tmp_path_factory.mktemp("adapters")
  shutil.copy(tiny_world / "adapter" / BASIC, folder / BASIC)
  torch_unet = StableDiffusionPipeline.from_pretrained(tiny_world / "sd").unet
  ref.save_official(
    ref.official_adapter(
      torch_unet, 16, ref.VISION_LIKE["hidden_size"], seed=9, kind="plus", resampler_dim=64, heads=1
    ),
    folder / PLUS,
  )
  rng = np.random.default_rng(3)
  images = [Image.open(tiny_world / "prompt.png")] + [
    Image.fromarray(rng.integers(0, 256, (36, 28, 3), dtype=np.uint8)) for _ in range(3)
  ]
  left = np.zeros((40, 40), np.uint8)
  left[:, :20] = 255
  masks = [
    Image.fromarray(left),
    Image.fromarray(255 - left),
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)),
  ]
  return {
    "root": tiny_world,
    "adapters": folder,
    "images": images,
    "masks": masks,
    "encoder": str(tiny_world / "adapter" / "image_encoder"),
    "latents": np.load(tiny_world / "latents.npy"),
  }


@pytest.fixture(scope="module")
def ours(world):
  models = load_stable_diffusion(
    str(world["root"] / "sd"),
    image_encoder=world["encoder"],
    ip_adapter=[str(world["adapters"] / BASIC), str(world["adapters"] / PLUS)],
  )
  return IPAdapterPipeline(models)


@pytest.fixture(scope="module")
def theirs(world):
  pipe = StableDiffusionPipeline.from_pretrained(world["root"] / "sd")
  pipe.load_ip_adapter(
    [str(world["adapters"])] * 2,
    subfolder=["", ""],
    weight_name=[BASIC, PLUS],
    image_encoder_folder=world["encoder"],
  )
  return pipe


def _theirs(world, pipe, scales, images=None, guidance=7.5, **kw):
  pipe.set_ip_adapter_scale(scales)
  return pipe(
    PROMPT,
    negative_prompt=NEGATIVE,
    num_inference_steps=STEPS,
    guidance_scale=guidance,
    num_images_per_prompt=2,
    latents=torch.from_numpy(world["latents"]),
    height=H,
    width=W,
    output_type="np",
    ip_adapter_image=images,
    **kw,
  ).images


def _ours(world, pipe, adapters, guidance=7.5):
  return pipe(
    PROMPT,
    adapters=adapters,
    negative_prompt=NEGATIVE,
    num_inference_steps=STEPS,
    guidance_scale=guidance,
    num_samples=2,
    latents=world["latents"],
    height=H,
    width=W,
    output_type="np",
  ).images


def _compare(actual, expected, what: str):
  err = float(np.abs(actual - expected).max())
  print(f"{what}: max abs image difference {err:.1e}")
  assert actual.shape == expected.shape == (2, H, W, 3)
  assert err <= 1e-4  # whole float32 sampling runs; measured 2.3e-6-3.5e-6 (docs/composition.md)
  return err


def test_two_adapters_basic_and_plus(world, ours, theirs):
  imgs = world["images"]
  expected = _theirs(world, theirs, [0.7, 0.4], [imgs[0], imgs[1]])
  actual = _ours(
    world, ours, [AdapterPrompt([imgs[0]], scale=0.7), AdapterPrompt([imgs[1]], scale=0.4)]
  )
  _compare(actual, expected, "basic + Plus")
  # Each adapter matters: dropping the second one's scale changes the images.
  alone = _ours(
    world, ours, [AdapterPrompt([imgs[0]], scale=0.7), AdapterPrompt([imgs[1]], scale=0.0)]
  )
  assert float(np.abs(alone - actual).max()) > 1e-3


def test_two_images_on_one_adapter_and_block_dictionary(world, ours, theirs):
  imgs = world["images"]
  blocks = {"down": {"block_1": [0.0, 1.0]}, "up": {"block_2": [0.5, 0.0, 1.0]}, "mid": 0.3}
  expected = _theirs(world, theirs, [blocks, 0.5], [[imgs[0], imgs[2]], [imgs[1], imgs[3]]])
  actual = _ours(
    world,
    ours,
    [AdapterPrompt([imgs[0], imgs[2]], scale=blocks), AdapterPrompt([imgs[1], imgs[3]], scale=0.5)],
  )
  _compare(actual, expected, "two images per adapter, block dictionary")


def test_style_preset_is_diffusers_instantstyle_dictionary(world, ours, theirs):
  names = ours.models.unet.cross_attention_names()
  # On this UNet the first up block with attentions is up_blocks.1 (3 attentions).
  assert adapter_scales.preset("style", names) == {"up": {"block_1": [0.0, 1.0, 0.0]}}
  imgs = world["images"]
  expected = _theirs(world, theirs, [{"up": {"block_1": [0.0, 1.0, 0.0]}}, 0.0], [imgs[0], imgs[1]])
  actual = _ours(
    world, ours, [AdapterPrompt([imgs[0]], scale="style"), AdapterPrompt([imgs[1]], scale=0.0)]
  )
  _compare(actual, expected, "style preset")


def test_masks_on_two_adapters(world, ours, theirs):
  imgs, masks = world["images"], world["masks"]
  processor = IPAdapterMaskProcessor()
  first = processor.preprocess(masks[:2], height=H, width=W)  # [2, 1, H, W]
  second = processor.preprocess(masks[2:], height=H, width=W)
  expected = _theirs(
    world,
    theirs,
    [0.8, 0.6],
    [[imgs[0], imgs[2]], [imgs[1]]],
    cross_attention_kwargs={
      "ip_adapter_masks": [first.reshape(1, 2, H, W), second.reshape(1, 1, H, W)]
    },
  )
  actual = _ours(
    world,
    ours,
    [
      AdapterPrompt([imgs[0], imgs[2]], scale=0.8, masks=masks[:2]),
      AdapterPrompt([imgs[1]], scale=0.6, masks=masks[2:]),
    ],
  )
  _compare(actual, expected, "masks on two adapters")


def test_saved_embeddings_reproduce_the_images(world, ours, theirs, tmp_path):
  imgs = world["images"]
  prompts = [AdapterPrompt([imgs[0], imgs[2]]), AdapterPrompt([imgs[1]])]
  path = str(tmp_path / "embeds.safetensors")
  save_image_embeds(path, ours.image_embeds(prompts), ["image_embeds", "hidden_states"])
  saved = load_image_embeds(path)
  assert [e.shape[:2] for e in saved] == [(2, 2), (2, 1)]
  expected = _theirs(
    world, theirs, [0.7, 0.4], None, ip_adapter_image_embeds=[torch.from_numpy(e) for e in saved]
  )
  from_file = _ours(
    world,
    ours,
    [AdapterPrompt(embeds=saved[0], scale=0.7), AdapterPrompt(embeds=saved[1], scale=0.4)],
  )
  from_images = _ours(
    world,
    ours,
    [AdapterPrompt(prompts[0].images, scale=0.7), AdapterPrompt(prompts[1].images, scale=0.4)],
  )
  _compare(from_file, expected, "saved embeddings against diffusers' ip_adapter_image_embeds")
  _compare(from_images, expected, "the images themselves against the saved embeddings")
  # (Without an image encoder: test_sample_py_composes_as_the_python_api.)


def _reference_loop(world, pipe, image_embeds, scale_at_step, guidance=7.5):
  """diffusers' UNet, DDIM and VAE step by step with the given [negative; positive] image
  embeddings per adapter and per-step scales (what diffusers' pipelines lack: windows and
  negative images)."""
  scheduler = pipe.scheduler
  scheduler.set_timesteps(STEPS)
  with torch.no_grad():
    positive, negative = pipe.encode_prompt(PROMPT, "cpu", 2, True, NEGATIVE)
    context = torch.cat([negative, positive])
    embeds = [
      torch.cat([e[:1].repeat(2, *([1] * (e.ndim - 1))), e[1:].repeat(2, *([1] * (e.ndim - 1)))])
      for e in image_embeds
    ]
    latents = torch.from_numpy(world["latents"]) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
      pipe.set_ip_adapter_scale(scale_at_step(i))
      out = pipe.unet(
        torch.cat([latents] * 2),
        t,
        encoder_hidden_states=context,
        added_cond_kwargs={"image_embeds": embeds},
      ).sample
      uncond, cond = out.chunk(2)
      latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
  return pipe.image_processor.postprocess(images, output_type="np")


def _diffusers_embeds(pipe, images, kinds):
  """Per adapter [2, I, ...]: the zero / mean-grey unconditional features and the images'."""
  out = []
  for imgs, kind in zip(images, kinds):
    hidden = kind == "hidden_states"
    with torch.no_grad():
      pos, neg = pipe.encode_image(imgs, "cpu", 1, hidden)
    out.append(torch.stack([neg, pos]))
  return out


def test_timestep_window_against_a_reference_loop(world, ours, theirs):
  imgs = world["images"]
  embeds = _diffusers_embeds(theirs, [[imgs[0]], [imgs[1]]], ["image_embeds", "hidden_states"])
  # Adapter 0 for the first third of the steps, adapter 1 from a third on.
  expected = _reference_loop(
    world,
    theirs,
    embeds,
    lambda i: [0.9 if i / STEPS < 0.34 else 0.0, 0.5 if i / STEPS >= 0.34 else 0.0],
  )
  actual = _ours(
    world,
    ours,
    [
      AdapterPrompt([imgs[0]], scale=0.9, window=(0.0, 0.34)),
      AdapterPrompt([imgs[1]], scale=0.5, window=(0.34, 1.0)),
    ],
  )
  _compare(actual, expected, "timestep windows")


def test_negative_image_against_a_reference_loop(world, ours, theirs):
  imgs = world["images"]
  embeds = _diffusers_embeds(theirs, [[imgs[0]], [imgs[1]]], ["image_embeds", "hidden_states"])
  with torch.no_grad():
    negative_basic = theirs.encode_image([imgs[3]], "cpu", 1, False)[0]
  embeds[0] = torch.stack([negative_basic, embeds[0][1]])
  expected = _reference_loop(world, theirs, embeds, lambda i: [0.8, 0.3])
  actual = _ours(
    world,
    ours,
    [
      AdapterPrompt([imgs[0]], scale=0.8, negative_image=imgs[3]),
      AdapterPrompt([imgs[1]], scale=0.3),
    ],
  )
  _compare(actual, expected, "negative image")
  plain = _ours(
    world, ours, [AdapterPrompt([imgs[0]], scale=0.8), AdapterPrompt([imgs[1]], scale=0.3)]
  )
  assert float(np.abs(plain - actual).max()) > 1e-3


def test_nothing_a_user_changes_recompiles(world, ours):
  imgs, masks = world["images"], world["masks"]
  requests = [
    [
      AdapterPrompt([imgs[0], imgs[2]], scale=0.8, masks=masks[:2]),
      AdapterPrompt([imgs[1]], scale=0.6, masks=masks[2:], window=(0.0, 0.5)),
    ],
    [
      AdapterPrompt([imgs[3], imgs[1]], scale="style", masks=masks[1::-1]),
      AdapterPrompt([imgs[2]], scale={"up": 1.0}, masks=masks[:1], window=(0.2, 0.9)),
    ],
    [
      AdapterPrompt([imgs[1], imgs[0]], scale=np.linspace(0, 1, 11), masks=masks[1:]),
      AdapterPrompt([imgs[0]], scale="style_and_layout", masks=masks[1:2], window=(0.5, 1.0)),
    ],
  ]
  outputs = [_ours(world, ours, requests[0])]
  compiled = ours.cache_size()
  outputs += [_ours(world, ours, r) for r in requests[1:]]
  assert ours.cache_size() == compiled
  assert float(np.abs(outputs[0] - outputs[1]).max()) > 1e-3
  assert float(np.abs(outputs[1] - outputs[2]).max()) > 1e-3


@pytest.mark.parametrize(
  "prompts,message",
  [
    ([AdapterPrompt(["x"])], "1 adapter prompts for 2 loaded adapters"),
    ([AdapterPrompt([0], masks=[0, 0]), AdapterPrompt([0])], "2 masks for 1 images"),
    (
      [AdapterPrompt([0], scale={"down": {"block_2": 1.0}}), AdapterPrompt([0])],
      "down.block_2: no such down block",
    ),
    (
      [AdapterPrompt([0], scale={"up": {"block_1": [1.0, 0.0]}}), AdapterPrompt([0])],
      "expected 3 values",
    ),
    ([AdapterPrompt([0], window=(0.5, 0.5)), AdapterPrompt([0])], "needs 0 <= start < end <= 1"),
    ([AdapterPrompt([0], window=(-0.1, 0.5)), AdapterPrompt([0])], "needs 0 <= start < end"),
    ([AdapterPrompt([0], weights=[1.0, 2.0]), AdapterPrompt([0])], "1 images need 1 finite"),
  ],
)
def test_bad_requests_are_refused_with_one_line(world, ours, prompts, message):
  image = world["images"][0]
  for p in prompts:  # placeholders stand for the test image and mask
    p.images = [image for _ in p.images]
    if p.masks is not None:
      p.masks = [world["masks"][0] for _ in p.masks]
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    ours.prepare(PROMPT, adapters=prompts, num_inference_steps=STEPS, height=H, width=W)


def _files(world, tmp_path):
  """The test images and masks as files."""
  paths = {}
  for kind in ("images", "masks"):
    for i, image in enumerate(world[kind]):
      paths[f"{kind[:-1]}{i}"] = str(tmp_path / f"{kind[:-1]}{i}.png")
      image.save(paths[f"{kind[:-1]}{i}"])
  return paths


def _argv(world, tmp_path, *extra):
  return [
    "--pretrained",
    str(world["root"] / "sd"),
    "--prompt",
    PROMPT,
    "--negative_prompt",
    NEGATIVE,
    "--num_inference_steps",
    str(STEPS),
    "--num_samples",
    "2",
    "--height",
    str(H),
    "--width",
    str(W),
    "--latents",
    str(world["root"] / "latents.npy"),
    "--ip_adapter",
    str(world["adapters"] / BASIC),
    "--ip_adapter",
    str(world["adapters"] / PLUS),
    *extra,
  ]


def test_sample_py_composes_as_the_python_api(world, ours, tmp_path):
  from ipadapter_jax.cli.sample import main as sample_main

  f = _files(world, tmp_path)
  imgs, masks = world["images"], world["masks"]
  out = tmp_path / "grid.png"
  embeds = tmp_path / "embeds.safetensors"
  common = [
    "--scale",
    "style",
    "--scale",
    "0.6",
    "--ip_window",
    "0,1",
    "--ip_window",
    "0.3,1",
    "--mask",
    f"{f['mask0']},{f['mask1']}",
    "--mask",
    "",
    "--out",
    str(out),
    "--save_array",
    str(tmp_path / "out.npy"),
  ]
  argv = _argv(
    world,
    tmp_path,
    "--image_encoder",
    world["encoder"],
    "--image",
    f"{f['image0']},{f['image2']}",
    "--image",
    f["image1"],
    "--negative_image",
    "",
    "--negative_image",
    f["image3"],
    "--save_image_embeds",
    str(embeds),
    *common,
  )
  assert sample_main(argv) == 0
  expected = _ours(
    world,
    ours,
    [
      AdapterPrompt([imgs[0], imgs[2]], scale="style", masks=masks[:2]),
      AdapterPrompt([imgs[1]], scale=0.6, window=(0.3, 1.0), negative_image=imgs[3]),
    ],
  )
  ref.assert_close(np.load(tmp_path / "out.npy"), expected)
  # The saved embeddings, without an image encoder, give the same images.
  assert (
    sample_main(_argv(world, tmp_path, "--image_embeds", str(embeds), *common, "--overwrite")) == 0
  )
  ref.assert_close(np.load(tmp_path / "out.npy"), expected)


@pytest.mark.parametrize(
  "extra,message",
  [
    (["--scale", "0.5"], "--scale given 1 times for 2 --ip_adapter"),
    (["--mask", "{mask0},{mask1}", "--mask", ""], "2 masks for 1 images"),
    (["--scale", '{"down": {"block_7": 1.0}}', "--scale", "1"], "down.block_7: no such down block"),
    (
      ["--scale", '{"up": {"block_1": [1.0]}}', "--scale", '{"up": {"block_2": [1.0, 0.0]}}'],
      "up.block_2: expected 3 values",
    ),
    (["--ip_window", "0,1.5", "--ip_window", "0,1"], "needs 0 <= start < end <= 1"),
    (["--ip_window", "0.5,0.2", "--ip_window", "0,1"], "needs 0 <= start < end <= 1"),
    (["--scale", "stlye", "--scale", "1"], "not a number, a preset"),
  ],
)
def test_sample_py_refuses_bad_composition_in_one_line(world, tmp_path, capsys, extra, message):
  from ipadapter_jax.cli.sample import main as sample_main

  f = _files(world, tmp_path)
  out = tmp_path / "grid.png"
  argv = _argv(
    world,
    tmp_path,
    "--image_encoder",
    world["encoder"],
    "--image",
    f["image0"],
    "--image",
    f["image1"],
    "--out",
    str(out),
    "--save_image_embeds",
    str(tmp_path / "e.safetensors"),
    *[e.replace("{mask0}", f["mask0"]).replace("{mask1}", f["mask1"]) for e in extra],
  )
  capsys.readouterr()
  assert sample_main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error:") and message in err[-1], err
  assert (
    sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("image", "mask"))) == []
  )


@pytest.fixture(scope="module")
def sdxl(world, tmp_path_factory):
  """A tiny SDXL folder with the test image encoder and a basic adapter for it."""
  from diffusers import StableDiffusionXLPipeline

  tmp = tmp_path_factory.mktemp("sdxl")
  unet = ref.save_tiny_sdxl(tmp)
  ref.save_official(
    ref.official_adapter(unet, 4, ref.VISION_LIKE["projection_dim"], seed=11), tmp / BASIC
  )
  ref.save_official(
    ref.official_adapter(
      unet, 8, ref.VISION_LIKE["hidden_size"], seed=12, kind="plus", resampler_dim=64, heads=1
    ),
    tmp / PLUS,
  )
  theirs = StableDiffusionXLPipeline.from_pretrained(tmp / "xl")
  theirs.load_ip_adapter(
    [str(tmp)] * 2,
    subfolder=["", ""],
    weight_name=[BASIC, PLUS],
    image_encoder_folder=world["encoder"],
  )
  ours = IPAdapterPipeline(
    load_stable_diffusion(
      str(tmp / "xl"),
      image_encoder=world["encoder"],
      ip_adapter=[str(tmp / BASIC), str(tmp / PLUS)],
    )
  )
  return theirs, ours


def _sdxl_theirs(world, theirs, scales, **kw):
  theirs.set_ip_adapter_scale(scales)
  return theirs(
    PROMPT,
    negative_prompt=NEGATIVE,
    num_inference_steps=STEPS,
    guidance_scale=5.0,
    latents=torch.from_numpy(world["latents"][:1]),
    height=H,
    width=W,
    output_type="np",
    **kw,
  ).images


def _sdxl_ours(world, ours, adapters):
  return ours(
    PROMPT,
    adapters=adapters,
    negative_prompt=NEGATIVE,
    num_inference_steps=STEPS,
    guidance_scale=5.0,
    latents=world["latents"][:1],
    height=H,
    width=W,
    output_type="np",
  ).images


@pytest.mark.parametrize(
  "scale,theirs_scale",
  [
    ("style", {"up": {"block_0": [0.0, 1.0, 0.0]}}),  # diffusers' documented InstantStyle
    ("style_and_layout", {"down": {"block_1": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}),
    ({"down": 0.4, "mid": 0.7, "up": {"block_0": [1.0, 0.0, 0.5]}}, None),
  ],
)
def test_sdxl_two_adapters_block_scales_and_masks(world, sdxl, scale, theirs_scale):
  theirs, ours = sdxl
  imgs, masks = world["images"], world["masks"]
  processor = IPAdapterMaskProcessor()
  expected = _sdxl_theirs(
    world,
    theirs,
    [theirs_scale or scale, 0.5],
    ip_adapter_image=[[imgs[0], imgs[1]], imgs[2]],
    cross_attention_kwargs={
      "ip_adapter_masks": [
        processor.preprocess(masks[:2], height=H, width=W).reshape(1, 2, H, W),
        None,
      ]
    },
  )
  actual = _sdxl_ours(
    world,
    ours,
    [
      AdapterPrompt([imgs[0], imgs[1]], scale=scale, masks=masks[:2]),
      AdapterPrompt([imgs[2]], scale=0.5),
    ],
  )
  err = float(np.abs(actual - expected).max())
  print(f"SDXL basic (masked, scale {scale}) + Plus: max abs image difference {err:.1e}")
  assert err <= 1e-4


def test_sdxl_saved_embeddings(world, sdxl, tmp_path):
  theirs, ours = sdxl
  imgs = world["images"]
  path = str(tmp_path / "embeds.safetensors")
  save_image_embeds(
    path,
    ours.image_embeds([AdapterPrompt([imgs[0]]), AdapterPrompt([imgs[1], imgs[2]])]),
    ["image_embeds", "hidden_states"],
  )
  saved = load_image_embeds(path)
  expected = _sdxl_theirs(
    world, theirs, [0.6, 0.8], ip_adapter_image_embeds=[torch.from_numpy(e) for e in saved]
  )
  actual = _sdxl_ours(
    world,
    ours,
    [AdapterPrompt(embeds=saved[0], scale=0.6), AdapterPrompt(embeds=saved[1], scale=0.8)],
  )
  err = float(np.abs(actual - expected).max())
  print(f"SDXL saved embeddings: max abs image difference {err:.1e}")
  assert err <= 1e-4


def _dot_count(jaxpr) -> int:
  """dot_general equations in a jaxpr, nested programs included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "dot_general"
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _dot_count(inner)
  return count


def _loop_and_total_dots(pipe, **request):
  import jax

  from ipadapter_jax.generation.pipeline import generate

  plan, inputs = pipe.prepare(PROMPT, num_inference_steps=STEPS, height=H, width=W, **request)
  closed = jax.make_jaxpr(lambda state, inputs: generate(pipe._graphdef, state, inputs, plan=plan))(
    pipe._state, inputs
  )
  loop = next(e for e in closed.jaxpr.eqns if e.primitive.name in ("scan", "while"))
  body = loop.params.get("jaxpr") or loop.params["body_jaxpr"]  # fori_loop: a scan
  return _dot_count(body.jaxpr), _dot_count(closed.jaxpr)


def test_an_extra_adapter_adds_only_its_attention_to_the_loop(world, ours):
  one = IPAdapterPipeline(
    load_stable_diffusion(
      str(world["root"] / "sd"),
      image_encoder=world["encoder"],
      ip_adapter=str(world["adapters"] / BASIC),
    )
  )
  imgs = world["images"]
  loop_1, total_1 = _loop_and_total_dots(one, image=imgs[0])
  loop_2, total_2 = _loop_and_total_dots(
    ours, adapters=[AdapterPrompt([imgs[0]]), AdapterPrompt([imgs[1]])]
  )
  layers = len(ours.models.unet.decoupled_layers())
  # Per layer and step: Q K_img^T and the weights times V_img. Its keys/values (and the Plus
  # projection) are computed once, before the loop.
  assert loop_2 - loop_1 == 2 * layers
  assert (total_2 - loop_2) - (total_1 - loop_1) >= 2 * layers


def test_each_adapter_saves_back_to_its_official_file(world, ours, tmp_path):
  from ipadapter_jax.weights import read_ip_adapter, save_ip_adapter

  loaded = ours.models.adapters()
  assert len(loaded) == 2 and loaded[1] is ours.models.extra_adapters[0]
  for adapter, name in zip(loaded, (BASIC, PLUS)):
    save_ip_adapter(adapter, str(tmp_path / name), dtype=np.float32)
    original, saved = (
      read_ip_adapter(str(world["adapters"] / name)),
      read_ip_adapter(str(tmp_path / name)),
    )
    assert sorted(saved) == sorted(original)
    for key in original:
      np.testing.assert_array_equal(saved[key], original[key], err_msg=key)
