"""What users take to diffusers: the pipeline's output object, and the README's diffusers snippet
run against `sample.py` on the same adapter file, image and start noise."""

import os
import re
import shutil

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ipadapter_jax.cli.sample import main as sample_main
from ipadapter_jax.generation.pipeline import IPAdapterPipeline
from ipadapter_jax.weights import load_stable_diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADING = "## Use your adapter in diffusers and ComfyUI"
PROMPT = "a photo of a red circle"
SCALE = "0.6"


def test_pipeline_output_is_pil_by_default_and_the_array_on_request(tiny_world):
  """Catches `.images` converted otherwise than diffusers converts its arrays, or differing
  between the two output types."""
  pipe = IPAdapterPipeline(load_stable_diffusion(str(tiny_world / "sd")))
  request = dict(num_inference_steps=2, num_samples=2, seed=0)
  array = pipe(PROMPT, output_type="np", **request).images
  assert isinstance(array, np.ndarray) and array.dtype == np.float32
  assert array.shape == (2, 32, 32, 3) and 0.0 <= array.min() and array.max() <= 1.0
  images = pipe(PROMPT, **request).images
  assert [(type(i), i.mode, i.size) for i in images] == [(Image.Image, "RGB", (32, 32))] * 2
  expected = VaeImageProcessor.numpy_to_pil(array)
  for ours, theirs in zip(images, expected):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  with pytest.raises(ValueError, match="output_type: expected one of pil, np, got 'latent'"):
    pipe(PROMPT, output_type="latent", **request)


def readme_snippet() -> str:
  """The python block of the README's diffusers section."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert readme.count(HEADING + "\n") == 1, "the README lost its diffusers section"
  section = readme.split(HEADING + "\n", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert len(blocks) == 1, blocks
  return blocks[0]


def test_readme_diffusers_snippet_draws_what_sample_py_draws(tiny_world, tmp_path, monkeypatch):
  """Catches a README snippet that no longer runs, an exported file diffusers loads otherwise than
  we do, and sample.py's per-image files differing from its array."""
  # The exported adapter as a run leaves it, with its image encoder beside it.
  adapter_dir = tmp_path / "adapter"
  adapter_dir.mkdir()
  shutil.copy(
    tiny_world / "adapter" / "ip-adapter.safetensors", adapter_dir / "ip_adapter.safetensors"
  )
  shutil.copytree(tiny_world / "adapter" / "image_encoder", adapter_dir / "image_encoder")
  # The snippet's ALL-CAPS placeholders become the tiny world's paths, and its 30 steps 3.
  substitutions = {
    "BASE_MODEL": str(tiny_world / "sd"),
    "ADAPTER_DIR": str(adapter_dir),
    "PROMPT_IMAGE": str(tiny_world / "prompt.png"),
    "num_inference_steps=30": "num_inference_steps=3",
  }
  code = readme_snippet()
  for placeholder, value in substitutions.items():
    assert placeholder in code, placeholder
    code = code.replace(placeholder, value)
  assert f'"{PROMPT}"' in code and f"set_ip_adapter_scale({SCALE})" in code

  drawn = []  # the start noise diffusers draws, handed to sample.py as --latents
  original = StableDiffusionPipeline.prepare_latents

  def recording(self, *args, **kwargs):
    latents = original(self, *args, **kwargs)
    drawn.append(latents.numpy().copy())
    return latents

  monkeypatch.setattr(StableDiffusionPipeline, "prepare_latents", recording)
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["pipe"].scheduler.init_noise_sigma == 1.0  # DDIM: the noise is the latents
  theirs = np.asarray(Image.open(tmp_path / "diffusers.png"), np.float64) / 255

  (latents,) = drawn
  np.save(tmp_path / "latents.npy", latents)
  argv = [
    "--pretrained",
    str(tiny_world / "sd"),
    "--prompt",
    PROMPT,
    "--image_encoder",
    str(adapter_dir / "image_encoder"),
    "--ip_adapter",
    str(adapter_dir / "ip_adapter.safetensors"),
    "--image",
    str(tiny_world / "prompt.png"),
    "--scale",
    SCALE,
    "--scheduler",
    "ddim",
    "--num_inference_steps",
    "3",
    "--num_samples",
    "1",
    "--latents",
    str(tmp_path / "latents.npy"),
    "--out",
    str(tmp_path / "ours.png"),
    "--save_array",
    str(tmp_path / "ours.npy"),
  ]
  assert sample_main(argv) == 0
  ours = np.load(tmp_path / "ours.npy")[0]
  # diffusers' PNG is its float image rounded to 1/255: within half a level of ours, plus the
  # float32 tolerance of tests/test_pipeline.py.
  err = float(np.abs(theirs - ours).max())
  print(f"README snippet against sample.py: max abs difference {err:.2e} (PNG rounding)")
  assert err <= 0.5 / 255 + 1e-5
  assert np.abs(theirs - 0.5).max() > 0.1  # an image, not a flat grey
  own = np.asarray(Image.open(tmp_path / "ours_0.png"))
  np.testing.assert_array_equal(own, np.round(ours * 255).astype(np.uint8))
