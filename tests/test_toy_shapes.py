"""The toy world's shapes: deterministic examples, and attributes read back from pixels."""

import json

import numpy as np

from ipadapter_jax.toy import shapes
from ipadapter_jax.data.image_text import build_image_text_dataset
from ipadapter_jax.data.input_pipeline import decode_image, decode_text, open_source


def test_examples_are_a_function_of_seed_and_index():
  assert shapes.example(3, 17) == shapes.example(3, 17)
  np.testing.assert_array_equal(shapes.render(shapes.example(3, 17)),
                                shapes.render(shapes.example(3, 17)))
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


def test_captions_use_the_vocabulary_and_name_true_attributes():
  for i in range(100):
    ex = shapes.example(0, i)
    words = ex.caption.split()
    assert set(words) <= set(shapes.WORDS)
    assert all(w in (ex.shape, ex.colour, ex.background) for w in words
               if w in shapes.SHAPES or w in shapes.COLOURS or w in shapes.BACKGROUNDS)


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
