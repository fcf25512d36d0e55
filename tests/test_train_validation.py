"""ipadapter_jax.train.validation: what a validation reports equals CLIP-I / CLIP-T (and the
attribute fractions) recomputed with transformers' CLIPModel on the images it generated; what
it asks the pipeline for; and its errors."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from ipadapter_jax.generation.pipeline import IPAdapterPipeline, PipelineOutput
from ipadapter_jax.models import AdapterParam
from ipadapter_jax.tokenizer import write_word_tokenizer
from ipadapter_jax.train.checks import TrainingError
from ipadapter_jax.train.loading import load_models
from ipadapter_jax.train.validation import Validation
from tests import torch_reference as ref
from tests.test_train import tiny_config

SIZE = 32
COLOURS = {"red": (220, 30, 40), "blue": (30, 40, 220)}
# (prompt image colour, caption, annotated colour, annotated shape): the judge below reads the
# colour of the image and always sees a square, so colour matches 3 of 4 and shape 2 of 4.
RECORDS = [
  ("red", "a red square", "red", "square"),
  ("blue", "a blue circle on a green background", "blue", "circle"),
  ("red", "photo of a red circle", "blue", "square"),
  ("blue", "blue square", "blue", "circle"),
]


def colour_judge(image):
  """A judge for the config ("tests.test_train_validation:colour_judge"), reading uint8 pixels."""
  image = np.asarray(image, np.float64)
  return {
    "colour": "red" if image[..., 0].mean() > image[..., 2].mean() else "blue",
    "shape": "square",
  }


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  """A tiny random CLIPModel folder with its tokenizer and image settings (the scorer), and
  the torch model to recompute the scores with."""
  folder = tmp_path_factory.mktemp("scorer")
  config = CLIPConfig(
    text_config=dict(ref.TEXT_LIKE, eos_token_id=1),
    vision_config=ref.VISION_LIKE,
    projection_dim=24,
  )
  model = ref.randomize_(CLIPModel(config), 38)  # cosines of both signs below
  model.save_pretrained(folder)
  CLIPImageProcessor(size=30, crop_size=30).save_pretrained(folder)
  write_word_tokenizer(str(folder), ref.WORDS, model_max_length=16)
  return str(folder), model


def _annotations(tmp_path, records=RECORDS, attributes=True, name="eval.json"):
  """Prompt images with texture (so that CLIP-I is not trivial) and their annotation file."""
  rng = np.random.default_rng(len(records))
  entries = []
  for i, (colour, text, annotated_colour, shape) in enumerate(records):
    pixels = np.clip(np.asarray(COLOURS[colour]) + rng.normal(0, 25, (40, 36, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / f"{i}.png")
    entry = {"image_file": f"{i}.png", "text": text}
    if attributes:
      entry.update(colour=annotated_colour, shape=shape)
    entries.append(entry)
  (tmp_path / name).write_text(json.dumps(entries))
  return str(tmp_path / name)


class _StubPipe:
  """Makes each image from its request alone (not its place in a batch): the prompt image,
  resized and darkened, or for a text prompt a gradient coloured by the caption. Values are
  k / 255 exactly, so the uint8 conversion before scoring is lossless."""

  def __init__(self, image_prompt):
    self.models = type(
      "M", (), {"unet": type("U", (), {"image_proj": object() if image_prompt else None})()}
    )()
    self.calls = []

  def update_weights(self, weights):
    self.calls.append(("update_weights", weights))

  @staticmethod
  def make(prompt, image):
    if image is not None:
      pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float64)
      return np.floor(pixels * 0.8) / 255.0
    red = 200 if "red" in prompt else 20
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([np.full((SIZE, SIZE), red), 4 * y + len(prompt), 6 * x], -1) / 255.0

  def __call__(self, prompts, images, *, output_type="pil", **request):
    assert output_type == "np"  # scoring reads the float array
    self.calls.append(("call", list(prompts), images, request))
    return PipelineOutput(
      np.stack(
        [self.make(p, None if images is None else images[k]) for k, p in enumerate(prompts)]
      ).astype(np.float32)
    )


def _torch_scores(model, folder, generated, prompt_images, captions):
  """CLIP-I and CLIP-T as the paper defines them, with transformers."""
  processor = CLIPImageProcessor.from_pretrained(folder)
  tokenizer = CLIPTokenizer.from_pretrained(folder)

  def unit(x):
    return torch.nn.functional.normalize(getattr(x, "pooler_output", x), dim=-1)

  as_pil = [Image.fromarray(np.round(np.asarray(g) * 255).astype(np.uint8)) for g in generated]
  with torch.no_grad():
    gen = unit(model.get_image_features(**processor(images=as_pil, return_tensors="pt")))
    prm = unit(model.get_image_features(**processor(images=prompt_images, return_tensors="pt")))
    ids = tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
    txt = unit(model.get_text_features(input_ids=ids))
  cosines = (gen * txt).sum(-1)
  return {
    "clip_i": float((gen * prm).sum(-1).mean()),
    "clip_t": float((2.5 * cosines.clamp(min=0)).mean()),
    "cosines": cosines.numpy(),
  }


def _config(tmp_path, annotations, folder, **overrides):
  return tiny_config(
    tmp_path,
    "unused",
    **{
      "eval_every": 1,
      "eval_annotations": annotations,
      "eval_clip": folder,
      "eval_steps": 3,
      "eval_guidance_scale": 4.0,
      "seed": 5,
      **overrides,
    },
  )


def test_image_prompt_scores_are_clip_i_and_clip_t_of_what_it_generated(clip_folder, tmp_path):
  """Catches scores of the wrong pairs (a padded batch's duplicate counted, images in another
  order), CLIP-T against the empty prompt instead of the caption, an adapter run asked its
  caption instead of the image alone, the weights applied after generating, and attribute
  fractions swapped or not reported."""
  folder, model = clip_folder
  annotations = _annotations(tmp_path)
  cfg = _config(
    tmp_path,
    annotations,
    folder,
    eval_batch_size=3,
    eval_judge="tests.test_train_validation:colour_judge",
  )
  pipe = _StubPipe(image_prompt=True)
  validation = Validation(cfg, pipe)
  weights = {"marker": 2}
  scores = validation(weights)

  assert pipe.calls[0] == ("update_weights", weights)
  calls = pipe.calls[1:]
  assert [len(c[1]) for c in calls] == [3, 3]  # 4 requests: 3, then 1 padded to 3
  for _, prompts, images, request in calls:
    assert prompts == [""] * 3 and len(images) == 3
    assert {k: v for k, v in request.items() if k != "seed"} == dict(
      num_inference_steps=3, guidance_scale=4.0, height=SIZE, width=SIZE
    )
  prompt_images = [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(4)]
  generated = [_StubPipe.make("", image) for image in prompt_images]
  expected = _torch_scores(model, folder, generated, prompt_images, [r[1] for r in RECORDS])
  assert sorted(scores) == ["eval/clip_i", "eval/clip_t", "eval/colour", "eval/shape"]
  assert abs(scores["eval/clip_i"] - expected["clip_i"]) <= 1e-5
  assert abs(scores["eval/clip_t"] - expected["clip_t"]) <= 1e-5
  # both sides of CLIPScore's max(cos, 0) are compared
  assert (expected["cosines"] > 0.1).any() and (expected["cosines"] < -0.02).any()
  assert scores["eval/colour"] == 0.75 and scores["eval/shape"] == 0.5


def test_base_run_is_asked_its_captions(clip_folder, tmp_path):
  """A run without an adapter generates from the captions alone and is scored on them; a judge
  with records lacking the attributes reports no attribute scores; eval_limit takes the first
  records only."""
  folder, model = clip_folder
  annotations = _annotations(tmp_path, attributes=False)
  cfg = _config(
    tmp_path,
    annotations,
    folder,
    eval_limit=3,
    eval_batch_size=16,
    eval_judge="tests.test_train_validation:colour_judge",
  )
  pipe = _StubPipe(image_prompt=False)
  scores = Validation(cfg, pipe)({})
  ((_, prompts, images, request),) = pipe.calls[1:]  # min(16, 3 records): one call of 3
  captions = [r[1] for r in RECORDS[:3]]
  assert prompts == captions and images is None and request["seed"] == 5
  prompt_images = [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(3)]
  generated = [_StubPipe.make(c, None) for c in captions]
  expected = _torch_scores(model, folder, generated, prompt_images, captions)
  assert sorted(scores) == ["eval/clip_i", "eval/clip_t"]
  assert abs(scores["eval/clip_i"] - expected["clip_i"]) <= 1e-5
  assert abs(scores["eval/clip_t"] - expected["clip_t"]) <= 1e-5


def test_errors_name_the_config_key(clip_folder, tmp_path):
  """A missing annotation file, a missing image and an unimportable judge are TrainingErrors
  naming the key, not tracebacks from deep inside."""
  folder, _ = clip_folder
  pipe = _StubPipe(image_prompt=True)
  with pytest.raises(TrainingError, match=r"^eval_annotations: .*nope\.json"):
    Validation(_config(tmp_path, str(tmp_path / "nope.json"), folder), pipe)
  annotations = _annotations(tmp_path)
  (tmp_path / "2.png").unlink()
  with pytest.raises(TrainingError, match=r"^eval_annotations: .*2\.png: not a readable image"):
    Validation(_config(tmp_path, annotations, folder), pipe)
  (tmp_path / "bad.json").write_text("[{\"text\": \"no image\"}]")
  with pytest.raises(TrainingError, match=r"^eval_annotations: "):
    Validation(_config(tmp_path, str(tmp_path / "bad.json"), folder), pipe)
  good = _annotations(tmp_path, name="good.json")
  for judge in (
    "no_such_module_here:judge",
    "tests.test_train_validation:no_such_judge",
    "tests.test_train_validation",
  ):
    with pytest.raises(
      TrainingError,
      match=rf"^eval_judge: '{judge}' is not an importable "
      r"'module:function'",
    ):
      Validation(_config(tmp_path, good, folder, eval_judge=judge), pipe)


def test_real_pipeline_scores_are_the_scorer_on_its_images(tiny_world, clip_folder, tmp_path):
  """With the tiny SD and IP-Adapter: the scores are those of the images the pipeline makes
  with the weights passed in, with the configured steps, guidance and seed."""
  folder, model = clip_folder
  records = RECORDS[:3]
  annotations = _annotations(tmp_path, records=records, attributes=False)
  cfg = tiny_config(
    tiny_world,
    "unused",
    **{
      "eval_every": 1,
      "eval_annotations": annotations,
      "eval_clip": folder,
      "eval_steps": 2,
      "eval_guidance_scale": 3.0,
      "eval_batch_size": 4,
    },
  )
  sd = load_models(cfg)
  pipe = IPAdapterPipeline(sd)
  weights = jax.tree.map(
    lambda x: np.asarray(x) * 3.0 + 0.2, nnx.state(sd.networks(), AdapterParam)
  )
  scores = Validation(cfg, pipe)(weights)
  prompt_images = [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(3)]
  generated = pipe(
    [""] * 3,
    prompt_images,
    num_inference_steps=2,
    guidance_scale=3.0,
    seed=cfg.seed,
    height=SIZE,
    width=SIZE,
    output_type="np",
  ).images
  expected = _torch_scores(model, folder, generated, prompt_images, [r[1] for r in records])
  assert abs(scores["eval/clip_i"] - expected["clip_i"]) <= 1e-5
  assert abs(scores["eval/clip_t"] - expected["clip_t"]) <= 1e-5
  pipe.update_weights(nnx.state(sd.networks(), AdapterParam))  # the loaded weights differ
  loaded = pipe(
    [""] * 3,
    prompt_images,
    num_inference_steps=2,
    guidance_scale=3.0,
    seed=cfg.seed,
    height=SIZE,
    width=SIZE,
    output_type="np",
  ).images
  assert np.abs(loaded - generated).max() > 1e-2
