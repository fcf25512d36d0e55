"""The toy world end to end (every stage, CI-sized), and its exports in the PyTorch world."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.numpy import load_file
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer

from ipadapter_jax import evaluate, toy
from ipadapter_jax.cli import convert
from ipadapter_jax.cli import evaluate as evaluate_command
from ipadapter_jax.cli import toy as toy_command
from ipadapter_jax.generation.pipeline import IPAdapterPipeline
from ipadapter_jax.toy import shapes
from ipadapter_jax.toy.configs import world as toy_world
from ipadapter_jax.weights import load_stable_diffusion
from ipadapter_jax.weights.files import CheckpointError
from tests import torch_reference as ref

# One worker runs every test on the quick toy world, which is then built once.
pytestmark = pytest.mark.xdist_group("toy_world")


@pytest.fixture(scope="module")
def world(quick_toy_world):
  return quick_toy_world


SETTINGS = [
  "base",
  "base",
  "adapter",
  "adapter",
  "full fine-tune",
  "community model + the same adapter",
]


def test_every_stage_runs_and_reports(world, capsys):
  workdir, result = world
  with open(os.path.join(workdir, "eval.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  assert [r["setting"].split(",")[0] for r in saved["rows"]] == SETTINGS
  count, zoom, size = 8, 4, toy_world.IMAGE_SIZE
  grid = Image.open(os.path.join(workdir, "grid.png"))
  assert grid.size == (count * size * zoom, len(SETTINGS) * size * zoom)  # prompt + settings
  _assert_scores_are_the_grids(workdir, saved["rows"], np.asarray(grid)[::zoom, ::zoom], size)
  for stage in ("adapter", "finetune"):  # every stage logged its losses, all finite
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
      losses = [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]
    assert losses and np.all(np.isfinite(losses)), stage
  # The trainable counts, recounted from the files the stages wrote: the official adapter file
  # (image projection + to_k_ip/to_v_ip), and for the full fine-tune the same plus its UNet.
  size = lambda path: sum(a.size for a in load_file(os.path.join(workdir, path)).values())
  adapter = size("adapter/ip_adapter.safetensors")
  unet = size("finetune/pipeline/unet/diffusion_pytorch_model.safetensors")
  assert saved["parameters"] == {
    "adapter": adapter,
    "full fine-tune": unet + size("finetune/ip_adapter.safetensors"),
  }
  assert saved["training"]["finetune"]["steps"] == 10
  measured = {(c["claim"][:2], c["measure"]) for c in saved["claims"]}
  assert {claim for claim, _ in measured} >= {"1.", "2.", "3.", "4."}

  exports = {
    p: os.path.getmtime(os.path.join(workdir, p))
    for p in ("adapter/ip_adapter.safetensors", "finetune/pipeline")
  }
  capsys.readouterr()
  toy.run_world(workdir, quick=True)  # a rerun reuses every finished stage
  err = capsys.readouterr().err
  assert err.count("reusing") == 2
  assert exports == {p: os.path.getmtime(os.path.join(workdir, p)) for p in exports}


def _assert_scores_are_the_grids(workdir, rows, grid, size):
  """eval.json's rows equal the scores of the images grid.png shows (the same uint8 pixels),
  and each rate's interval is the Wilson interval of its count."""
  ps = toy.PromptSet.make(toy.QUICK.eval_images)
  n = len(ps.examples)
  cells = [
    [grid[r * size : (r + 1) * size, c * size : (c + 1) * size] for c in range(n)]
    for r in range(len(SETTINGS))
  ]
  np.testing.assert_array_equal(np.stack(cells[0]), np.stack([np.asarray(i) for i in ps.images]))
  scorer = evaluate.CLIPScorer.load(toy.shipped_weights()["clip"])
  own = [ex.colour for ex in ps.examples]
  mixed = [f"a {c} shape" for c in ps.other_colours]
  # grid rows 1-5: base text only, adapter image only, adapter image + another colour in text,
  # full fine-tune image only, community model + adapter image only
  asked_colours = (own, own, ps.other_colours, own, own)
  clip_captions = (ps.captions, ps.captions, mixed, ps.captions, ps.captions)
  for images, row, asked, captions in zip(cells[1:], rows[1:], asked_colours, clip_captions):
    scores = scorer.score(images, ps.images, captions)
    assert abs(scores["clip_i"] - row["clip_i"]["mean"]) <= 1e-5, (row, scores)
    assert abs(scores["clip_t"] - row["clip_t"]["mean"]) <= 1e-5, (row, scores)
    judged = [shapes.judge(image) for image in images]
    hits = {
      "colour_asked": [j["colour"] == c for j, c in zip(judged, asked)],
      "colour_of_image": [j["colour"] == c for j, c in zip(judged, own)],
      "shape_of_image": [j["shape"] == ex.shape for j, ex in zip(judged, ps.examples)],
      "community_background": [j["background"] in shapes.WORLDS["community"] for j in judged],
    }
    for key, h in hits.items():
      lo, hi = evaluate.wilson_interval(sum(h), n)
      assert row[key] == {"rate": np.mean(h), "ci95": [lo, hi], "n": n}, (key, row)


def test_validation_scores_what_the_run_exports(world):
  """The adapter stage's last validation line equals the held-out images sampled again with
  the exported adapter and scored independently."""
  workdir, _ = world
  with open(os.path.join(workdir, "adapter", "metrics.jsonl")) as f:
    evals = [json.loads(line) for line in f if "eval/clip_i" in line]
  assert [e["step"] for e in evals] == [10]  # eval_every > the run's steps: at its end only
  with open(os.path.join(workdir, "adapter", "config.json")) as f:
    cfg = json.load(f)  # the run's resolved config
  with open(os.path.join(workdir, "data", "heldout", "data.json")) as f:
    records = json.load(f)[: cfg["eval_limit"]]
  images = [
    Image.open(os.path.join(workdir, "data", "heldout", r["image_file"])).convert("RGB")
    for r in records
  ]
  weights = toy.shipped_weights()
  pipe = IPAdapterPipeline(
    load_stable_diffusion(
      weights["base"],
      image_encoder=weights["clip"],
      ip_adapter=os.path.join(workdir, "adapter", "ip_adapter.safetensors"),
    )
  )
  generated = evaluate.generate(
    pipe,
    [""] * len(records),
    images,
    batch_size=len(records),
    seed=cfg["seed"],
    num_inference_steps=cfg["eval_steps"],
    guidance_scale=cfg["eval_guidance_scale"],
  )
  scores = evaluate.CLIPScorer.load(weights["clip"]).score(
    generated, images, [r["text"] for r in records]
  )
  matches = evaluate.attribute_matches(generated, records, shapes.judge)
  assert abs(evals[-1]["eval/clip_i"] - scores["clip_i"]) <= 1e-5, (evals, scores)
  assert abs(evals[-1]["eval/clip_t"] - scores["clip_t"]) <= 1e-5, (evals, scores)
  assert evals[-1]["eval/colour"] == np.mean(matches["colour"])
  assert evals[-1]["eval/shape"] == np.mean(matches["shape"])


def test_shipped_weights_match_their_manifest(tmp_path):
  """The pretrained toy weights in the package are exactly those MANIFEST.json lists and
  describes; a changed, missing or extra file is refused by name."""
  folders = toy.shipped_weights()
  assert sorted(folders) == ["base", "clip", "community"]
  with open(os.path.join(toy.SHIPPED, toy.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["command"] == "ipadapter-jax toy pretrain"
  for stage in toy.STAGES:
    record = manifest["stages"][stage]
    assert record["steps"] > 0 and record["seconds"] > 0 and np.isfinite(record["final_loss"])
  assert "eval/shape" in manifest["stages"]["base"]["validation"]
  vae = manifest["stages"]["vae"]  # checked before the base was built on it
  assert min(a["all"] for a in vae["judge_on_reconstructions"].values()) >= 0.98, vae
  for name in ("base", "community"):  # each loads, here and in diffusers
    sd = load_stable_diffusion(folders[name])
    assert sd.unet is not None and sd.vae.config.scaling_factor == vae["scaling_factor"]
    UNet2DConditionModel.from_pretrained(folders[name], subfolder="unet")
    AutoencoderKL.from_pretrained(folders[name], subfolder="vae")
  CLIPModel.from_pretrained(folders["clip"])

  copy = tmp_path / "weights"
  import shutil

  shutil.copytree(toy.SHIPPED, copy)
  weights = copy / "base" / "unet" / "diffusion_pytorch_model.safetensors"
  data = bytearray(weights.read_bytes())
  data[-1] ^= 1
  weights.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors: sha256"):
    toy.shipped_weights(str(copy))
  (copy / "extra.txt").write_text("x")
  with pytest.raises(CheckpointError, match="the files differ"):
    toy.shipped_weights(str(copy))


def test_judge_reads_the_shipped_vae_reconstructions(capsys):
  """What every toy rate rests on: the judge reads background, colour and shape back from the
  shipped VAE's reconstructions of the evaluation's 600 held-out prompt images (of each world),
  >= 98% of the time; and our reconstruction is diffusers' (the same folder in both)."""
  vae = load_stable_diffusion(toy.shipped_weights()["base"]).vae
  rates = {}
  for world in ("base", "community"):
    examples = [shapes.example(toy.EVAL_SEED, i, toy_world.IMAGE_SIZE, world) for i in range(600)]
    renders = np.stack([shapes.render(ex) for ex in examples])
    rates[world] = shapes.judge_accuracy(toy.reconstruct(vae, renders), examples)
  with capsys.disabled():
    print(f"\njudge on 600 VAE reconstructions per world: {rates}")
  assert all(r["all"] >= 0.98 and r["drew_a_shape"] >= 0.98 for r in rates.values()), rates
  reference = AutoencoderKL.from_pretrained(os.path.join(toy.shipped_weights()["base"], "vae"))
  x = torch.from_numpy(renders[:4].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
  with torch.no_grad():
    expected = reference.decode(reference.encode(x).latent_dist.mean).sample
  expected = np.clip((expected.numpy().transpose(0, 2, 3, 1) + 1) / 2, 0, 1)
  ref.assert_close(toy.reconstruct(vae, renders[:4]), expected)


def test_pretrain_rebuilds_the_weights_from_nothing(tmp_path, capsys):
  """`pretrain` trains the CLIP, the base and the community model, then ships them with a
  manifest that `shipped_weights` accepts."""
  out = str(tmp_path / "weights")
  assert (
    toy_command.main(["pretrain", "--quick", "--workdir", str(tmp_path / "run"), "--out", out]) == 0
  )
  folders = toy.shipped_weights(out)
  with open(os.path.join(out, toy.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["command"] == "ipadapter-jax toy pretrain --quick"
  assert [manifest["stages"][s]["steps"] for s in toy.STAGES] == [10] * 5
  assert set(manifest["stages"]["vae"]["judge_on_reconstructions"]) == {
    "heldout",
    "heldout_community",
  }
  for stage in ("base", "community"):  # validated on their own world's held-out images
    assert 0 <= manifest["stages"][stage]["validation"]["eval/colour"] <= 1
  community = load_stable_diffusion(folders["community"])
  assert (
    community.tokenizer("a red circle on a pink background")["input_ids"][6]
    != community.tokenizer.unk_token_id
  )  # the community world's words are in the vocabulary


def test_shipped_image_encoder_tells_shapes_apart(capsys):
  """The adapter can only carry what its image embedding holds. The shipped image encoder's
  embeddings of held-out renders, classified by the nearest class mean (fitted on the first
  half), recover the colour almost always and the shape well above chance (25%); the first CLIP
  stage's recovered the shape 35% of the time."""
  scorer = evaluate.CLIPScorer.load(toy.shipped_weights()["clip"])
  examples = toy.held_out(512)
  embeds = evaluate.image_embeddings(
    scorer.image_encoder, scorer.processor, [Image.fromarray(shapes.render(ex)) for ex in examples]
  )
  right = {}
  for attribute in ("colour", "shape"):
    labels = np.array([getattr(ex, attribute) for ex in examples])
    classes = sorted(set(labels))
    means = np.stack([embeds[:256][labels[:256] == c].mean(axis=0) for c in classes])
    guess = np.array(classes)[np.argmax(embeds[256:] @ means.T, axis=1)]
    right[attribute] = float(np.mean(guess == labels[256:]))
  with capsys.disabled():
    print(f"\nimage encoder, nearest class mean on 256 held-out renders: {right}")
  assert right["colour"] >= 0.95 and right["shape"] >= 0.55, right


def test_toy_clip_is_a_transformers_clip_model():
  folder = toy.shipped_weights()["clip"]
  model = CLIPModel.from_pretrained(folder).eval()
  processor = CLIPProcessor.from_pretrained(folder)
  images = [Image.fromarray(shapes.render(ex)) for ex in toy.held_out(3)]
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

  base, clip = toy.shipped_weights()["base"], toy.shipped_weights()["clip"]
  unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
  pipe = StableDiffusionPipeline(
    vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
    unet=unet,
    text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
    tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
    scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler"),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipe.load_ip_adapter(
    str(tmp_path / "adapter"),
    subfolder="",
    weight_name="toy_ip_adapter.safetensors",
    image_encoder_folder=None,
  )

  ours = load_stable_diffusion(base, image_encoder=clip, ip_adapter=out)
  g = torch.Generator().manual_seed(0)
  latent = toy_world.LATENT_SIZE
  x, t = torch.randn(2, 4, latent, latent, generator=g), torch.tensor([900, 20])
  ctx = torch.randn(2, 16, 64, generator=g)
  features = torch.randn(2, 64, generator=g)
  with torch.no_grad():
    expected = pipe.unet(
      x, t, ctx, added_cond_kwargs={"image_embeds": [features[:, None]]}
    ).sample.numpy()
  actual = ref.jit_call(
    ours.unet,
    jnp.asarray(x.numpy()),
    jnp.asarray(t.numpy()),
    jnp.asarray(ctx.numpy()),
    image_embeds=jnp.asarray(features.numpy()),
    layout="NCHW",
  )
  err = ref.assert_close(actual, expected)
  print(f"toy adapter exported by the convert CLI, loaded by diffusers: max abs error {err:.1e}")


def test_evaluate_command_on_a_coco_style_file(world, tmp_path, capsys):
  workdir, _ = world
  annotations = shapes.write_dataset(
    str(tmp_path / "prompts"), 3, seed=1, full_captions=True
  )  # held-out shapes
  base, clip = toy.shipped_weights()["base"], toy.shipped_weights()["clip"]
  adapter = os.path.join(workdir, "adapter", "ip_adapter.safetensors")
  argv = [
    "--pretrained",
    base,
    "--image_encoder",
    clip,
    "--ip_adapter",
    adapter,
    "--clip",
    clip,
    "--annotations",
    annotations,
    "--num_samples",
    "2",
    "--num_inference_steps",
    "3",
    "--batch_size",
    "2",
    "--out",
    str(tmp_path / "eval.json"),
  ]
  assert evaluate_command.main(argv) == 0
  result = json.loads((tmp_path / "eval.json").read_text())
  assert result["prompt_images"] == 3 and result["num_samples"] == 2

  # The same images again, scored with transformers' CLIPModel: each of a prompt image's two
  # samples against that prompt image and its caption.
  with open(annotations) as f:
    records = json.load(f)
  prompts = [Image.open(tmp_path / "prompts" / r["image_file"]).convert("RGB") for r in records]
  pipe = IPAdapterPipeline(load_stable_diffusion(base, image_encoder=clip, ip_adapter=adapter))
  generated = evaluate.generate(
    pipe,
    [""] * 3,
    prompts,
    batch_size=2,
    seed=0,
    scale=1.0,
    num_samples=2,
    guidance_scale=7.5,
    num_inference_steps=3,
  )
  assert generated.shape == (6, toy_world.IMAGE_SIZE, toy_world.IMAGE_SIZE, 3)
  model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
  as_pil = [Image.fromarray((np.clip(g, 0, 1) * 255).round().astype(np.uint8)) for g in generated]
  with torch.no_grad():
    out = model(
      **processor(
        text=[r["text"] for r in records for _ in range(2)],
        images=[p for p in prompts for _ in range(2)],
        return_tensors="pt",
        padding="max_length",
      )
    )
    gen = model.get_image_features(**processor(images=as_pil, return_tensors="pt"))
  gen = torch.nn.functional.normalize(getattr(gen, "pooler_output", gen), dim=-1)
  cos_i = (gen * torch.nn.functional.normalize(out.image_embeds, dim=-1)).sum(-1)
  cos_t = (gen * torch.nn.functional.normalize(out.text_embeds, dim=-1)).sum(-1)
  assert abs(result["clip_i"] - float(cos_i.mean())) <= 1e-4, (result, cos_i)
  assert abs(result["clip_t"] - float((2.5 * cos_t.clamp(min=0)).mean())) <= 1e-4, (result, cos_t)
  (tmp_path / "prompts" / "images" / "000001.png").write_bytes(b"not a png")
  capsys.readouterr()
  assert evaluate_command.main(argv) == 1  # a run error: the file, not the flags
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "000001.png" in err and len(err.splitlines()) == 1


def test_composition_rows_score_what_the_pipeline_draws(world):
  """eval.json's composition rates are the half-colour judgements of the images the adapter
  draws for those pairs, masks and seeds (re-sampled here), and the judge reads halves."""
  from ipadapter_jax.generation.image_prompts import AdapterPrompt
  from ipadapter_jax.toy import composition as toy_composition

  workdir, result = world
  rates = result["composition"]
  assert set(rates) == {"two images, left/right masks", "two images, no masks"}
  ps = toy.PromptSet.make(toy.QUICK.eval_images)
  pairs = toy_composition.colour_pairs(ps.examples)[: toy.QUICK.eval_images // 2]
  assert all(ps.examples[i].colour != ps.examples[j].colour for i, j in pairs)
  pipe = IPAdapterPipeline(
    load_stable_diffusion(
      toy.shipped_weights()["base"],
      image_encoder=toy.shipped_weights()["clip"],
      ip_adapter=os.path.join(workdir, "adapter", "ip_adapter.safetensors"),
    )
  )
  masks = list(toy_composition.half_masks(toy_world.IMAGE_SIZE))
  left = []
  for i, j in pairs:
    image = pipe(
      "",
      adapters=[AdapterPrompt([ps.images[i], ps.images[j]], masks=masks)],
      num_inference_steps=toy.QUICK.sampling_steps,
      guidance_scale=toy.QUICK.guidance_scale,
      seed=i,
      output_type="np",
    ).images[0]
    left.append(
      toy_composition.half_colours(evaluate.to_uint8(image[None])[0])[0] == ps.examples[i].colour
    )
  assert rates["two images, left/right masks"]["left = first image's colour"]["rate"] == np.mean(
    left
  )
  # The judge itself: a red left half and a blue right half on white.
  drawn = np.full((32, 32, 3), 245, np.uint8)
  drawn[8:24, 4:16], drawn[8:24, 16:28] = shapes.COLOURS["red"], shapes.COLOURS["blue"]
  assert toy_composition.half_colours(drawn) == ("red", "blue")
  drawn[:, 16:] = 245
  assert toy_composition.half_colours(drawn) == ("red", "none")


def test_structure_rows_score_what_the_pipeline_draws(world):
  """eval.json's img2img and inpainting rates are the judgements of the images the adapter
  draws for those pairs, strengths, masks and seeds (re-sampled here); the kept half of an
  inpainted image is the init's up to the VAE's error."""
  from ipadapter_jax.toy import composition as toy_composition
  from ipadapter_jax.toy import structure as toy_structure

  workdir, result = world
  rates = result["structure"]
  quick, size = toy.QUICK, toy_world.IMAGE_SIZE
  assert list(rates["img2img"]) == [
    f"strength {s}, {name}"
    for s in toy_structure.STRENGTHS
    for name in ("image prompt (scale 1.0)", "no image prompt (scale 0)")
  ]
  assert rates["strength"] in toy_structure.STRENGTHS and rates["seconds"] > 0
  choice = rates["strength_choice"]  # made on validation pairs, then used for the claim
  assert choice["strength"] == rates["strength"] and choice["pairs"] == quick.strength_pairs
  assert (
    toy_structure.pick_strength(
      {float(k.split()[1].rstrip(",")): r for k, r in choice["img2img"].items()}
    )
    == rates["strength"]
  )
  ps = toy.PromptSet.make(quick.eval_images)
  pairs = toy_structure.contrast_pairs(ps.examples)[: quick.eval_images // 2]
  assert rates["pairs"] == len(pairs)
  assert all(ps.examples[i].colour != ps.examples[j].colour for i, j in pairs)
  pipe = IPAdapterPipeline(
    load_stable_diffusion(
      toy.shipped_weights()["base"],
      image_encoder=toy.shipped_weights()["clip"],
      ip_adapter=os.path.join(workdir, "adapter", "ip_adapter.safetensors"),
    )
  )
  # One padded batch of QUICK.batch_size requests, seed 0, as the evaluation sampled them.
  padded = [pairs[min(k, len(pairs) - 1)] for k in range(quick.batch_size)]
  request = dict(
    init_image=[ps.images[i] for i, _ in padded],
    scale=1.0,
    seed=0,
    num_inference_steps=quick.sampling_steps,
    guidance_scale=quick.guidance_scale,
    output_type="np",
  )
  prompts = [ps.images[j] for _, j in padded]
  drawn = evaluate.to_uint8(
    pipe([""] * len(padded), prompts, strength=rates["strength"], **request).images[: len(pairs)]
  )
  judged = [shapes.judge(image) for image in drawn]
  row = rates["img2img"][f"strength {rates['strength']}, image prompt (scale 1.0)"]
  assert row["colour = prompt image's"]["rate"] == np.mean(
    [g["colour"] == ps.examples[j].colour for g, (_, j) in zip(judged, pairs)]
  )
  assert row["shape = init image's"]["rate"] == np.mean(
    [g["shape"] == ps.examples[i].shape for g, (i, _) in zip(judged, pairs)]
  )

  left, right = toy_composition.half_masks(size)
  halves = [int(ps.examples[i].centre[1] >= size // 2) for i, _ in padded]
  drawn = evaluate.to_uint8(
    pipe(
      [""] * len(padded),
      prompts,
      strength=1.0,
      mask_image=[(left, right)[h] for h in halves],
      **request,
    ).images[: len(pairs)]
  )
  row = rates["inpainting"]["shape's half repainted, image prompt (scale 1.0)"]
  kept = [slice(size // 2, None), slice(0, size // 2)]
  diffs = [
    np.abs(image[:, kept[h]].astype(float) - np.asarray(ps.images[i])[:, kept[h]]).mean()
    for image, (i, _), h in zip(drawn, pairs, halves)
  ]
  assert row["kept half: mean abs difference"] == round(float(np.mean(diffs)), 2)
  assert row["repainted half: prompt image's colour"]["rate"] == np.mean(
    [
      toy_composition.half_colours(image)[h] == ps.examples[j].colour
      for image, (_, j), h in zip(drawn, pairs, halves)
    ]
  )


def test_strength_rule_prefers_colour_among_strengths_that_keep_the_init_shape():
  from ipadapter_jax.toy import structure as toy_structure

  at = lambda rate: {"rate": rate, "ci95": [rate - 0.05, rate + 0.05], "n": 100}
  row = lambda init, prompt, both: {
    "shape = init image's": at(init),
    "shape = prompt image's": at(prompt),
    "prompt's colour, init's shape": at(both),
  }
  rates = {0.3: row(0.9, 0.1, 0.2), 0.5: row(0.7, 0.2, 0.5), 0.7: row(0.4, 0.35, 0.6)}
  assert toy_structure.pick_strength(rates) == 0.5  # 0.7 draws more, but not from the init
  rates[0.3] = row(0.9, 0.1, 0.5)
  assert toy_structure.pick_strength(rates) == 0.3  # a tie goes to the lower strength
  assert toy_structure.pick_strength({0.5: row(0.3, 0.3, 0.1), 0.7: row(0.3, 0.3, 0.2)}) == 0.7


def test_structure_judges_on_hand_made_images():
  """The structure checks' judges read what was painted: colour, shape and centre against the
  init and prompt examples, the repainted half's colour and the kept half's pixels."""
  from ipadapter_jax.toy import structure as toy_structure

  size = 32
  init = shapes.Example("square", "red", "white", 8, (10, 10), "")
  prompt = shapes.Example("circle", "blue", "black", 8, (20, 22), "")
  other = shapes.Example("cross", "red", "grey", 6, (16, 16), "")
  assert toy_structure.contrast_pairs([init, other, prompt]) == [(0, 2), (1, 2), (2, 0)]
  assert toy_structure.contrast_pairs([init, prompt]) == [(0, 1), (1, 0)]
  examples, pairs = [init, prompt], [(0, 1)]
  # Blue at the init square's place, a red square elsewhere, and nothing at all.
  recoloured = shapes.render(dataclasses.replace(init, colour="blue"), size)
  moved = shapes.render(dataclasses.replace(init, centre=(20, 22)), size)
  empty = np.full((size, size, 3), 245, np.uint8)
  assert toy_structure.blob_centre(recoloured) == (10.0, 10.0)
  assert toy_structure.blob_centre(empty) is None and not toy_structure.near(None, init)
  got = {
    name: toy_structure.img2img_scores(image[None], examples, pairs)
    for name, image in (("recoloured", recoloured), ("moved", moved), ("empty", empty))
  }
  rate = lambda name, measure: got[name][measure]["rate"]
  assert [rate("recoloured", m) for m in got["recoloured"]] == [1, 0, 1, 0, 1, 0, 1, 1]
  assert [rate("moved", m) for m in got["moved"]] == [0, 1, 1, 0, 0, 1, 0, 0]
  assert sum(rate("empty", m) for m in got["empty"]) == 0
  assert got["recoloured"]["colour = prompt image's"]["n"] == 1

  # Inpainting: the init's left half (its square's) repainted blue, the right half kept.
  assert toy_structure.masked_half(init, size) == 0 and toy_structure.masked_half(prompt, size) == 1
  source = shapes.render(init, size)
  repainted = source.copy()
  repainted[6:16, 4:16] = shapes.COLOURS["blue"]
  scores = toy_structure.inpaint_scores(repainted[None], examples, pairs, [source], size)
  assert [scores[m]["rate"] for m in list(scores)[:4]] == [1, 0, 1, 1]
  assert scores["kept half: mean abs difference"] == 0
  repainted[0, 24] = 0  # one changed pixel in the kept half: too few to be a shape
  unpainted = source.copy()
  unpainted[:, :16] = 245
  intruder = repainted.copy()
  intruder[20:26, 20:26] = shapes.COLOURS["red"]  # a shape where the init had none
  scores = toy_structure.inpaint_scores(
    np.stack([repainted, unpainted, intruder]), examples, pairs * 3, [source] * 3, size
  )
  assert scores["kept half: init image's colour"]["rate"] == pytest.approx(2 / 3)
  one_pixel = 245 / (32 * 16)  # mean over the kept half's pixels and channels
  red = np.abs(np.subtract(shapes.COLOURS["red"], 245)).mean()  # per pixel, over channels
  expected = (one_pixel + 0 + one_pixel + 36 * red / (32 * 16)) / 3
  assert scores["kept half: mean abs difference"] == round(expected, 2)
  assert scores["repainted half: prompt image's colour"]["rate"] == pytest.approx(2 / 3)
  assert scores["repainted halves with foreground: prompt image's colour"] == evaluate.rate(
    [True, True]
  )


def test_pretrain_replaces_only_its_own_weights_folder(tmp_path, capsys, monkeypatch):
  """Catches `toy pretrain --out DIR` deleting a folder it did not write (after minutes of
  training), and a rerun refused on its own output (the shipped weights, its default --out)."""
  from ipadapter_jax.cli import toy as command  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.toy import stages  # pylint: disable=import-outside-toplevel

  trained = tmp_path / "trained"
  for name in stages.PRETRAINED:  # stands in for the folders pretraining writes
    (trained / name).mkdir(parents=True)
    (trained / name / "config.json").write_text(name)
  monkeypatch.setattr(
    command, "pretrain", lambda workdir, sizes: {n: str(trained / n) for n in stages.PRETRAINED}
  )
  monkeypatch.setattr(stages, "stage_record", lambda workdir, name: {})
  argv = ["pretrain", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "weights")]
  for _ in range(2):  # the second run replaces the first's folder
    assert command.main(argv) == 0
    assert sorted(toy.shipped_weights(str(tmp_path / "weights"))) == sorted(stages.PRETRAINED)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".partial") or n.endswith(".tmp")]
  (tmp_path / "weights" / "notes.txt").write_text("mine")
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("mine")
  monkeypatch.setattr(command, "pretrain", lambda *a: pytest.fail("trained before checking --out"))
  for out in (tmp_path / "weights", mine):
    capsys.readouterr()
    assert command.main([*argv[:-1], str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out}" in err[0] and "notes.txt" in err[0], err
    assert (out / "notes.txt").read_text() == "mine"
