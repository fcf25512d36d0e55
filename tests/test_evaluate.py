"""CLIP-I / CLIP-T against transformers' CLIPModel, and the toy attribute scores."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from ipadapter_jax import evaluate
from ipadapter_jax.preprocessing import CLIPImageConfig
from ipadapter_jax.tokenizer import load_tokenizer, write_word_tokenizer
from ipadapter_jax.toy import shapes
from ipadapter_jax.weights import load_clip_text, load_clip_vision
from tests import torch_reference as ref


def test_clip_i_and_clip_t_match_transformers(tmp_path):
  config = CLIPConfig(
    text_config=dict(ref.TEXT_LIKE, eos_token_id=1),
    vision_config=ref.VISION_LIKE,
    projection_dim=24,
  )
  model = ref.randomize_(CLIPModel(config), 4)
  model.save_pretrained(tmp_path / "clip")
  CLIPImageProcessor(size=30, crop_size=30).save_pretrained(tmp_path / "clip")
  write_word_tokenizer(str(tmp_path / "clip"), ref.WORDS, model_max_length=16)

  rng = np.random.default_rng(0)
  generated = [rng.random((32, 40, 3)).astype(np.float32) for _ in range(3)]
  prompts = [Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)) for _ in range(3)]
  # With this CLIP the first caption's cosine is positive and the others' negative, so that both
  # sides of CLIPScore's max(cos, 0) are compared.
  captions = ["square circle", "a blue square on a green background", ""]

  processor = CLIPImageProcessor.from_pretrained(tmp_path / "clip")
  tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "clip"))
  as_pil = [Image.fromarray((g * 255).round().astype(np.uint8)) for g in generated]
  with torch.no_grad():
    features = lambda images: model.get_image_features(
      **processor(images=images, return_tensors="pt")
    )
    gen = features(as_pil)
    gen = getattr(gen, "pooler_output", gen)
    gen = torch.nn.functional.normalize(gen, dim=-1)
    prm = features(prompts)
    prm = torch.nn.functional.normalize(getattr(prm, "pooler_output", prm), dim=-1)
    ids = tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
    txt = model.get_text_features(input_ids=ids)
    txt = torch.nn.functional.normalize(getattr(txt, "pooler_output", txt), dim=-1)
  expected_i = float((gen * prm).sum(-1).mean())
  cosines = (gen * txt).sum(-1)
  assert cosines[0] > 0.1 and bool((cosines[1:] < -0.1).all()), cosines
  expected_t = float((2.5 * cosines.clamp(min=0)).mean())
  assert expected_t > 0.1

  vision = load_clip_vision(str(tmp_path / "clip"))
  text = load_clip_text(str(tmp_path / "clip"), with_projection=True)
  clip_config = CLIPImageConfig.from_folder(str(tmp_path / "clip"))
  ours_i = evaluate.clip_i(vision, clip_config, generated, prompts)
  ours_t = evaluate.clip_t(
    vision, clip_config, text, load_tokenizer(str(tmp_path / "clip")), generated, captions
  )
  assert abs(ours_i - expected_i) <= 1e-5 and abs(ours_t - expected_t) <= 1e-5
  ref.assert_close(evaluate.image_embeddings(vision, clip_config, generated), gen.numpy())
  ref.assert_close(
    evaluate.text_embeddings(text, load_tokenizer(str(tmp_path / "clip")), captions), txt.numpy()
  )
  # Pairs, not all against all: the prompts in another order give the other pairs' mean.
  other = float((gen * prm[[1, 2, 0]]).sum(-1).mean())
  assert (
    abs(evaluate.clip_i(vision, clip_config, generated, prompts[1:] + prompts[:1]) - other) <= 1e-5
    and abs(other - expected_i) > 1e-3
  )
  assert abs(evaluate.clip_i(vision, clip_config, prompts, prompts) - 1.0) <= 1e-6
  assert evaluate.clip_i(vision, clip_config, prompts[:1], prompts[1:2]) < 0.99


def test_attribute_matches_use_pixels_only():
  examples = [shapes.example(2, i) for i in range(8)]
  images = [shapes.render(ex) / 255.0 for ex in examples]
  targets = [{"colour": ex.colour, "shape": ex.shape} for ex in examples]
  matches = evaluate.attribute_matches(images, targets, shapes.judge)
  assert matches["colour"].tolist() == [True] * 8 and matches["shape"].tolist() == [True] * 8
  wrong = [{"colour": "none", "shape": ex.shape} for ex in examples]
  matches = evaluate.attribute_matches(images, wrong, shapes.judge)
  assert matches["colour"].tolist() == [False] * 8 and matches["shape"].all()


@pytest.mark.parametrize("successes,n", [(5, 10), (0, 10), (10, 10), (81, 263), (370, 384)])
def test_wilson_interval_matches_scipy(successes, n):
  from scipy.stats import binomtest

  expected = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
  lo, hi = evaluate.wilson_interval(successes, n)
  assert (lo, hi) == pytest.approx((expected.low, expected.high), abs=1e-9)
  r = evaluate.rate([True] * successes + [False] * (n - successes))
  assert r == {"rate": successes / n, "ci95": [lo, hi], "n": n}
  with pytest.raises(ValueError, match="at least one trial"):
    evaluate.wilson_interval(0, 0)


def test_prompt_images_are_read_inside_the_data_root_only(tmp_path):
  """Bug: an evaluation annotation file naming '../x.png' or an absolute path read a file from
  outside its image folder."""
  (tmp_path / "eval").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
  Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "eval" / "in.png")
  annotations = tmp_path / "eval" / "eval.json"
  for outside in ("../x.png", str(tmp_path / "x.png")):
    annotations.write_text(
      json.dumps([{"image_file": "in.png", "text": "a"}, {"image_file": outside, "text": "b"}])
    )
    with pytest.raises(
      ValueError,
      match=r"eval.json: entry 1: 'image_file' .* leaves the data "
      "root",
    ):
      evaluate.load_annotated_images(str(annotations))
  annotations.write_text(json.dumps([{"image_file": "in.png", "text": "a"}]))
  images, _ = evaluate.load_annotated_images(str(annotations))
  assert np.asarray(images[0]).max() == 7
