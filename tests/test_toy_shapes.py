"""The toy world's shapes: deterministic examples, and attributes read back from pixels."""

import json

import numpy as np

from ipadapter_jax import toy
from ipadapter_jax.data.image_text import build_image_text_dataset
from ipadapter_jax.data.input_pipeline import decode_image, decode_text, open_source
from ipadapter_jax.toy import shapes


def test_examples_are_a_function_of_seed_and_index():
  assert shapes.example(3, 17) == shapes.example(3, 17)
  np.testing.assert_array_equal(
    shapes.render(shapes.example(3, 17)), shapes.render(shapes.example(3, 17))
  )
  assert len({shapes.example(0, i) for i in range(50)}) == 50
  assert shapes.example(0, 1) != shapes.example(1, 1)


def test_judge_reads_every_attribute_back():
  n, right = 200, {"shape": 0, "colour": 0, "background": 0}
  rng = np.random.default_rng(0)
  for i in range(n):
    ex = shapes.example(7, i)
    noisy = np.clip(shapes.render(ex) + rng.normal(0, 12, (32, 32, 3)), 0, 255)  # like samples
    judged = shapes.judge(noisy / 255.0)
    for key, truth in (("shape", ex.shape), ("colour", ex.colour), ("background", ex.background)):
      right[key] += judged[key] == truth
  assert right == {"shape": n, "colour": n, "background": n}


def test_judge_is_checked_on_600_held_out_renders(capsys):
  """The judge the toy world's rates rest on, on the evaluation's own prompt images: exact on
  clean renders, >= 98% on 3-tap-blurred ones (soft edges like a sample's), and every render,
  blurred or not, counts as a drawn shape while scattered pixels do not."""
  examples = toy.held_out(600)
  renders = [shapes.render(ex) for ex in examples]
  clean = shapes.judge_accuracy(renders, examples)
  blurred = shapes.judge_accuracy([shapes.blur(r) for r in renders], examples)
  with capsys.disabled():
    print(f"\njudge on 600 held-out renders: clean {clean}, blurred {blurred}")
  assert clean == {"background": 1.0, "colour": 1.0, "shape": 1.0, "all": 1.0, "drew_a_shape": 1.0}
  assert blurred["all"] >= 0.98 and blurred["drew_a_shape"] == 1.0
  rng = np.random.default_rng(0)
  for _ in range(50):
    scattered = np.full((32, 32, 3), shapes.BACKGROUNDS["white"], np.float32)
    scattered[rng.random((32, 32)) < 0.15] = shapes.COLOURS["red"]
    assert shapes.judge(scattered)["overlap"] < shapes.DREW_A_SHAPE


def test_blur_is_the_separable_1_2_1_kernel():
  dot = np.zeros((5, 5, 3), np.float32)
  dot[2, 2] = 16.0
  taps = np.array([1.0, 2.0, 1.0])
  expected = np.zeros((5, 5))
  expected[1:4, 1:4] = np.outer(taps, taps)
  np.testing.assert_allclose(shapes.blur(dot)[..., 0], expected)


def test_captions_use_the_vocabulary_and_name_true_attributes():
  for i in range(100):
    ex = shapes.example(0, i)
    words = ex.caption.split()
    assert set(words) <= set(shapes.WORDS)
    assert all(
      w in (ex.shape, ex.colour, ex.background)
      for w in words
      if w in shapes.SHAPES or w in shapes.COLOURS or w in shapes.BACKGROUNDS
    )


def test_dataset_in_the_official_format_builds(tmp_path):
  annotations = shapes.write_dataset(str(tmp_path / "shapes"), 12, seed=1)
  records = json.loads(open(annotations).read())
  assert len(records) == 12 and {"image_file", "text"} <= set(records[0])
  report = build_image_text_dataset(annotations, str(tmp_path / "shapes"), str(tmp_path / "built"))
  assert report.num_skipped == 0
  source = open_source(str(tmp_path / "built"))
  captions = sorted(decode_text(source[i]["text"]) for i in range(len(source)))
  assert captions == sorted(r["text"] for r in records)
  image = np.asarray(decode_image(source[0]["image"]))
  assert image.shape == (32, 32, 3)
