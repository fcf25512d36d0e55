"""The toy world end to end (every stage, CI-sized), and its exports in the PyTorch world."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer

from ipadapter_jax import convert, evaluate, toy
from ipadapter_jax.data import shapes
from ipadapter_jax.pipeline import IPAdapterPipeline
from ipadapter_jax.weights import load_stable_diffusion
from tests import torch_reference as ref


# One worker runs every test on the quick toy world, which is then built once.
pytestmark = pytest.mark.xdist_group("toy_world")


@pytest.fixture(scope="module")
def world(quick_toy_world):
  return quick_toy_world


def test_every_stage_runs_and_reports(world, capsys):
  workdir, result = world
  with open(os.path.join(workdir, "eval.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  assert [r["setting"].split(",")[0] for r in saved["rows"]] == ["base", "base", "adapter",
                                                                  "adapter"]
  count, zoom, size = 8, 4, toy.VISION_CONFIG["image_size"]
  grid = Image.open(os.path.join(workdir, "grid.png"))
  assert grid.size == (count * size * zoom, 4 * size * zoom)  # prompt, text, image, image + text
  _assert_scores_are_the_grids(workdir, saved["rows"], np.asarray(grid)[::zoom, ::zoom], size)
  for stage in ("clip", "base", "adapter"):  # every stage logged its losses, all finite
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
      losses = [json.loads(line)["loss"] for line in f]
    assert losses and np.all(np.isfinite(losses)), stage

  exports = {p: os.path.getmtime(os.path.join(workdir, p))
             for p in ("clip/clip", "base/pipeline", "adapter/ip_adapter.safetensors")}
  capsys.readouterr()
  toy.run(workdir, quick=True)  # a rerun reuses every finished stage
  err = capsys.readouterr().err
  assert err.count("reusing") == 3
  assert exports == {p: os.path.getmtime(os.path.join(workdir, p)) for p in exports}


def _assert_scores_are_the_grids(workdir, rows, grid, size):
  """eval.json's rows equal the scores of the images grid.png shows (the same uint8 pixels)."""
  ps = toy.PromptSet.make(toy.QUICK.eval_images)
  cells = [[grid[r * size:(r + 1) * size, c * size:(c + 1) * size]
            for c in range(len(ps.examples))] for r in range(4)]
  np.testing.assert_array_equal(np.stack(cells[0]), np.stack([np.asarray(i) for i in ps.images]))
  scorer = evaluate.CLIPScorer.load(os.path.join(workdir, "clip", "clip"))
  own = [ex.colour for ex in ps.examples]
  mixed = [f"a {c} shape" for c in ps.other_colours]
  # grid rows 1-3: base text only, adapter image only, adapter image + another colour in text
  for images, row, asked, captions in zip(cells[1:], rows[1:], (own, own, ps.other_colours),
                                          (ps.captions, ps.captions, mixed)):
    scores = scorer.score(images, ps.images, captions)
    assert abs(scores["clip_i"] - row["clip_i"]) <= 1e-5, (row, scores)
    assert abs(scores["clip_t"] - row["clip_t"]) <= 1e-5, (row, scores)
    judged = [shapes.judge(image) for image in images]
    assert row["colour_asked"] == np.mean([j["colour"] == c for j, c in zip(judged, asked)]), row
    assert row["colour_of_image"] == np.mean([j["colour"] == c for j, c in zip(judged, own)]), row
    assert row["shape_of_image"] == np.mean([j["shape"] == ex.shape
                                             for j, ex in zip(judged, ps.examples)]), row


def test_toy_clip_is_a_transformers_clip_model(world):
  workdir, _ = world
  folder = os.path.join(workdir, "clip", "clip")
  model = CLIPModel.from_pretrained(folder).eval()
  processor = CLIPProcessor.from_pretrained(folder)
  images = [Image.fromarray(shapes.render(ex, 16)) for ex in toy.held_out(3)]
  captions = [shapes.describe(ex) for ex in toy.held_out(3)]
  with torch.no_grad():
    inputs = processor(text=captions, images=images, return_tensors="pt", padding="max_length")
    out = model(**inputs)
  scorer = evaluate.CLIPScorer.load(folder)
  image = evaluate.image_embeddings(scorer.image_encoder, scorer.processor, images)
  text = evaluate.text_embeddings(scorer.text_encoder, scorer.tokenizer, captions)
  expected = torch.nn.functional.normalize(out.image_embeds, dim=-1).numpy()
  ref.assert_close(image, expected)
  ref.assert_close(text, torch.nn.functional.normalize(out.text_embeds, dim=-1).numpy())
  assert abs(float(model.logit_scale.detach()) - np.log(1 / 0.07)) < 1e-5


def test_exported_toy_adapter_loads_in_diffusers(world, tmp_path):
  workdir, _ = world
  out = str(tmp_path / "adapter" / "toy_ip_adapter.safetensors")
  os.makedirs(os.path.dirname(out))
  assert convert.main(["to-official", os.path.join(workdir, "adapter"), "--out", out]) == 0

  base = os.path.join(workdir, "base", "pipeline")
  unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
  pipe = StableDiffusionPipeline(  # the toy base is pixel space; the VAE is never used here
      vae=AutoencoderKL(**ref.VAE_LIKE), unet=unet,
      text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
      tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
      scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler"), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.load_ip_adapter(str(tmp_path / "adapter"), subfolder="",
                       weight_name="toy_ip_adapter.safetensors", image_encoder_folder=None)

  ours = load_stable_diffusion(base, image_encoder=os.path.join(workdir, "clip", "clip"),
                               ip_adapter=out)
  g = torch.Generator().manual_seed(0)
  x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([900, 20])
  ctx = torch.randn(2, 16, 64, generator=g)
  features = torch.randn(2, 64, generator=g)
  with torch.no_grad():
    expected = pipe.unet(x, t, ctx, added_cond_kwargs={"image_embeds": [features[:, None]]}
                         ).sample.numpy()
  actual = ref.jit_call(ours.unet, jnp.asarray(x.numpy()), jnp.asarray(t.numpy()),
                        jnp.asarray(ctx.numpy()), image_embeds=jnp.asarray(features.numpy()),
                        layout="NCHW")
  err = ref.assert_close(actual, expected)
  print(f"toy adapter exported by the convert CLI, loaded by diffusers: max abs error {err:.1e}")


def test_evaluate_command_on_a_coco_style_file(world, tmp_path, capsys):
  workdir, _ = world
  annotations = shapes.write_dataset(str(tmp_path / "prompts"), 3, seed=1, size=16,
                                     full_captions=True)
  base, clip = os.path.join(workdir, "base", "pipeline"), os.path.join(workdir, "clip", "clip")
  adapter = os.path.join(workdir, "adapter", "ip_adapter.safetensors")
  argv = ["--pretrained", base, "--image_encoder", clip, "--ip_adapter", adapter,
          "--clip", clip, "--annotations", annotations,
          "--num_samples", "2", "--num_inference_steps", "3", "--batch_size", "2",
          "--out", str(tmp_path / "eval.json")]
  assert evaluate.main(argv) == 0
  result = json.loads((tmp_path / "eval.json").read_text())
  assert result["prompt_images"] == 3 and result["num_samples"] == 2

  # The same images again, scored with transformers' CLIPModel: each of a prompt image's two
  # samples against that prompt image and its caption.
  with open(annotations) as f:
    records = json.load(f)
  prompts = [Image.open(tmp_path / "prompts" / r["image_file"]).convert("RGB") for r in records]
  pipe = IPAdapterPipeline(load_stable_diffusion(base, image_encoder=clip, ip_adapter=adapter))
  generated = evaluate.generate(pipe, [""] * 3, prompts, batch_size=2, seed=0, scale=1.0,
                                num_samples=2, guidance_scale=7.5, num_inference_steps=3)
  assert generated.shape == (6, 16, 16, 3)
  model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
  as_pil = [Image.fromarray((np.clip(g, 0, 1) * 255).round().astype(np.uint8)) for g in generated]
  with torch.no_grad():
    out = model(**processor(text=[r["text"] for r in records for _ in range(2)],
                            images=[p for p in prompts for _ in range(2)], return_tensors="pt",
                            padding="max_length"))
    gen = model.get_image_features(**processor(images=as_pil, return_tensors="pt"))
  gen = torch.nn.functional.normalize(getattr(gen, "pooler_output", gen), dim=-1)
  cos_i = (gen * torch.nn.functional.normalize(out.image_embeds, dim=-1)).sum(-1)
  cos_t = (gen * torch.nn.functional.normalize(out.text_embeds, dim=-1)).sum(-1)
  assert abs(result["clip_i"] - float(cos_i.mean())) <= 1e-4, (result, cos_i)
  assert abs(result["clip_t"] - float((2.5 * cos_t.clamp(min=0)).mean())) <= 1e-4, (result, cos_t)
  (tmp_path / "prompts" / "images" / "000001.png").write_bytes(b"not a png")
  capsys.readouterr()
  assert evaluate.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "000001.png" in err and len(err.splitlines()) == 1
