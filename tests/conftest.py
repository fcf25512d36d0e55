import os
import tempfile

# One persistent compilation cache per test run, shared with the subprocesses tests start:
# the same tiny programs compile once instead of in every test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax-cache-"))
# The tests run on the CPU. libtpu (installed for tests/test_tpu_compile.py, which compiles for TPU
# topologies without a TPU) is then not probed by every process the tests start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile-only: libtpu's lockfile guards real TPU chips, of which there are none here. The
# tpu_compile xdist group keeps those tests in one worker; without the group (`--dist load`, say)
# the lockfile would fail every topology query of a worker while another worker holds it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import torch_reference as ref  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def unet_folders(tmp_path_factory):
  """{family: (diffusers UNet with random weights, its saved folder)} built once per session."""
  out = {}
  for seed, (name, config) in enumerate(
    [("sd15", ref.SD15_LIKE), ("sd2", ref.SD2_LIKE), ("sdxl", ref.SDXL_LIKE)]
  ):
    model = ref.tiny_unet(config, seed=seed)
    folder = tmp_path_factory.mktemp(f"unet_{name}")
    model.save_pretrained(folder)
    out[name] = (model, str(folder))
  return out


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
  """A tiny SD folder (sd/), an image encoder and an official adapter (adapter/), an image
  prompt (prompt.png) and initial latents for 2 samples of 32x32 (latents.npy)."""
  import numpy as np
  from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
  from PIL import Image
  from safetensors.torch import save_file
  from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
  )

  from ipadapter_jax.tokenizer import write_word_tokenizer

  tmp = tmp_path_factory.mktemp("world")
  write_word_tokenizer(str(tmp / "words"), ref.WORDS, model_max_length=16)
  scheduler = DDIMScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
  )
  unet = ref.tiny_unet(ref.SD15_LIKE, 2)
  pipe = StableDiffusionPipeline(
    vae=ref.randomize_(AutoencoderKL(**ref.VAE_LIKE), 0),
    text_encoder=ref.randomize_(CLIPTextModel(CLIPTextConfig(**ref.TEXT_LIKE)), 1),
    tokenizer=CLIPTokenizer.from_pretrained(str(tmp / "words")),
    unet=unet,
    scheduler=scheduler,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipe.save_pretrained(tmp / "sd")
  encoder = ref.randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**ref.VISION_LIKE)), 3)
  encoder.save_pretrained(tmp / "adapter" / "image_encoder")
  CLIPImageProcessor(size=30, crop_size=30).save_pretrained(tmp / "adapter" / "image_encoder")
  official = ref.official_adapter(unet, 4, ref.VISION_LIKE["projection_dim"], seed=5)
  save_file(
    {f"{s}.{k}": v for s, d in official.items() for k, v in d.items()},
    str(tmp / "adapter" / "ip-adapter.safetensors"),
  )
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(tmp / "prompt.png")
  np.save(tmp / "latents.npy", rng.standard_normal((2, 4, 16, 16)).astype(np.float32))
  return tmp


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """A built image-text dataset of 32 small solid-colour images with colour captions."""
  import json

  import numpy as np
  from PIL import Image

  from ipadapter_jax.data.image_text import build_image_text_dataset

  tmp = tmp_path_factory.mktemp("dataset")
  colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
  rng = np.random.default_rng(0)
  records = []
  for i in range(32):
    name = list(colours)[i % 3]
    pixels = np.clip(np.asarray(colours[name]) + rng.normal(0, 10, (40, 40, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp / f"{i}.png")
    records.append({"image_file": f"{i}.png", "text": f"a {name} square"})
  (tmp / "data.json").write_text(json.dumps(records))
  build_image_text_dataset(str(tmp / "data.json"), str(tmp), str(tmp / "built"))
  return str(tmp / "built")


@pytest.fixture(scope="session")
def quick_toy_world(tmp_path_factory):
  """The toy world at CI size, every stage run once: (workdir, eval.json contents)."""
  from ipadapter_jax import toy

  workdir = str(tmp_path_factory.mktemp("toy"))
  return workdir, toy.run_world(workdir, quick=True)
