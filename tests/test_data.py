"""Image-text datasets (TFDS ArrayRecord), the grain input pipeline and the embedding cache."""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ipadapter_jax.data.batches import make_train_iterator
from ipadapter_jax.data.cache import build_embedding_cache, load_empty_text
from ipadapter_jax.data.image_text import build_image_text_dataset, read_annotations
from ipadapter_jax.data.input_pipeline import (
  DataSpec,
  crop_offsets,
  crop_pixels,
  decode_image,
  decode_text,
  open_source,
)
from ipadapter_jax.preprocessing import (
  CLIPImageConfig,
  clip_pixels,
  shortest_side_size,
  to_rgb,
  vae_pixels,
)
from ipadapter_jax.tokenizer import load_tokenizer, tokenize, write_word_tokenizer
from tests import torch_reference as ref
from tests.test_storage import fake_gcs  # noqa: F401  (a fixture)

R = 16  # VAE resolution in these tests
CLIP = CLIPImageConfig(size=30, crop_size=(30, 30))  # VISION_LIKE's image size
CAPTIONS = [
  "a red circle",
  "a green square on a blue background",
  "photo of a blue circle",
  "a square",
  "red on green",
  "photo of a red square on a green background",
]
CORRUPT, MISSING, EMPTY = 5, 11, 7  # annotation positions
NUM_ENTRIES = 20


def _mesh():
  return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _picture(rng, height: int, width: int) -> np.ndarray:
  """Random colours in 4x4 blocks stretched over the image: structure a wrong crop would show."""
  blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(blocks).resize((width, height), Image.Resampling.NEAREST))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Generated images in the official JSON format: (root, annotation path, expected examples)."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  entries, expected = [], []
  for i in range(NUM_ENTRIES):
    height, width = 17 + 3 * i, 60 - 2 * i  # every (height, width) differs: it names the example
    caption = "" if i == EMPTY else CAPTIONS[i % len(CAPTIONS)]
    name = f"sub/{i:02d}.{'jpg' if i % 3 == 0 else 'png'}"
    entries.append({"image_file": name, "text": caption})
    if i == MISSING:
      continue
    pixels = _picture(rng, height, width)
    os.makedirs(root / "sub", exist_ok=True)
    image = Image.fromarray(pixels)
    if i == 2:  # transparency, composited onto white
      image = Image.fromarray(np.dstack([pixels, rng.integers(0, 256, (height, width), np.uint8)]))
    if i == 4:
      image = image.convert("L")
    image.save(root / name)
    if i == CORRUPT:
      data = (root / name).read_bytes()
      (root / name).write_bytes(data[: len(data) // 2])  # truncated
      continue
    with Image.open(root / name) as reread:  # what decoding the stored file must give
      expected.append(
        {"id": name, "text": caption, "pixels": np.asarray(to_rgb(reread)), "size": (height, width)}
      )
  annotations = root / "data.json"
  annotations.write_text(json.dumps(entries))
  return root, annotations, expected


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
  root, annotations, expected = folder
  out = tmp_path_factory.mktemp("datasets")
  report = build_image_text_dataset(str(annotations), str(root), str(out))
  return out, report, expected


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tokenizer")
  write_word_tokenizer(str(folder), ref.WORDS, model_max_length=16)
  return load_tokenizer(str(folder)), str(folder)


def _by_size(expected):
  return {e["size"]: e for e in expected}


def _sizes(batch) -> list[tuple[int, int]]:
  """The (height, width) of each example of a batch, from its time ids."""
  return [(int(h), int(w)) for h, w in np.asarray(batch["time_ids"])[:, :2]]


# ---------------------------------------------------------------------------------------------
# Building and reading back


def test_build_skips_bad_files_and_reads_back(built, folder):
  out, report, expected = built
  assert (report.num_annotations, report.num_examples, report.num_skipped) == (20, 18, 2)
  skipped = {s["image_file"]: s["reason"] for s in report.skipped}
  assert skipped[f"sub/{MISSING:02d}.png"] == "missing"
  assert skipped[f"sub/{CORRUPT:02d}.png"].startswith("corrupt: OSError")
  saved = json.loads(open(os.path.join(report.dataset_dir, "build_report.json")).read())
  assert saved == report.to_json()

  source = open_source(str(out))
  assert len(source) == len(expected) == 18
  for i, want in enumerate(expected):  # the annotation order is kept
    record = source[i]
    assert decode_text(record["id"]) == want["id"]
    assert decode_text(record["text"]) == want["text"]
    np.testing.assert_array_equal(np.asarray(decode_image(record["image"])), want["pixels"])
  assert decode_text(source[EMPTY - 1]["text"]) == ""  # after the corrupt file, index shifts

  by_name = open_source("image_text", data_dir=str(out))  # as any TFDS dataset: name + data_dir
  assert len(by_name) == 18 and by_name[3]["image"] == source[3]["image"]
  with pytest.raises(FileExistsError, match="already built"):
    build_image_text_dataset(str(folder[1]), str(folder[0]), str(out))


def test_annotations_as_json_lines(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text('{"image_file": "a.jpg", "text": "one"}\n\n{"image_file": "b.png", "text": ""}\n')
  assert read_annotations(str(path)) == [
    {"image_file": "a.jpg", "text": "one"},
    {"image_file": "b.png", "text": ""},
  ]
  path.write_text('{"image_file": "a.jpg", "text": "one"}\n{"image_file": "b.png"}\n')
  with pytest.raises(ValueError, match=r"data.jsonl: line 2: 'text' is missing"):
    read_annotations(str(path))
  with pytest.raises(FileNotFoundError, match="no such dataset folder"):
    open_source(str(tmp_path / "nothing" / "here"))


def test_tfrecord_dataset_without_tensorflow_is_explained(built, tmp_path):
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    pass
  else:
    pytest.skip("TensorFlow is installed: the tf.data route would convert the dataset")
  _, report, _ = built
  copy = tmp_path / "image_text" / "1.0.0"
  shutil.copytree(report.dataset_dir, copy)
  info = json.loads((copy / "dataset_info.json").read_text())
  (copy / "dataset_info.json").write_text(json.dumps(dict(info, fileFormat="tfrecord")))
  with pytest.raises(RuntimeError, match="stored as tfrecord, which only TensorFlow reads"):
    open_source(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The input pipeline


def test_processes_see_disjoint_examples_covering_the_epoch(built, tokenizer):
  out, _, expected = built
  source = open_source(str(out))
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=tokenizer[0])

  def run(seed, process_index, process_count=2, **kw):
    it = make_train_iterator(
      source,
      spec,
      global_batch_size=6,
      mesh=_mesh(),
      seed=seed,
      num_epochs=1,
      process_index=process_index,
      process_count=process_count,
      **kw,
    )
    return [_sizes(it.next_local()) for _ in range(3)], it

  seen = []
  for process in (0, 1):
    batches, it = run(7, process)
    with pytest.raises(StopIteration):
      it.next_local()
    assert all(len(b) == 3 for b in batches)  # global batch 6 over 2 processes
    seen.append([size for batch in batches for size in batch])
    assert run(7, process)[0] == batches  # same seed, same order
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(_by_size(expected))
  assert run(8, 0)[0] != run(7, 0)[0]

  it = make_train_iterator(
    source, spec, global_batch_size=6, mesh=_mesh(), seed=7, num_epochs=2
  )  # one process: epochs are shuffled differently
  first = [s for _ in range(3) for s in _sizes(it.next_local())]
  second = [s for _ in range(3) for s in _sizes(it.next_local())]
  assert sorted(first) == sorted(second) == sorted(_by_size(expected)) and first != second


def test_restored_iterator_continues_with_the_next_batch(built, tokenizer):
  out, _, _ = built
  source = open_source(str(out))
  spec = DataSpec(
    resolution=R, random_crop=True, clip=CLIP, tokenizer=tokenizer[0], tokenizer_2=tokenizer[0]
  )
  make = lambda **kw: make_train_iterator(
    source, spec, global_batch_size=4, mesh=_mesh(), seed=3, **kw
  )
  reference = make()
  expected = [reference.next_local() for _ in range(7)]  # crosses into the second epoch
  it = make()
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  restored = make()
  restored.set_state(state)
  for want in expected[2:5]:
    got = next(restored)
    assert (
      set(got) == set(want) == {"pixels", "clip_pixels", "input_ids", "input_ids_2", "time_ids"}
    )
    for key in want:
      np.testing.assert_array_equal(np.asarray(got[key]), want[key])
  with_workers = make(worker_count=1)  # worker processes give the same batches
  with_workers.set_state(restored.get_state())
  got = next(with_workers)
  with_workers.close()  # the arrays outlive the workers' shared memory
  for key in got:
    np.testing.assert_array_equal(np.asarray(got[key]), expected[5][key])
  other = make_train_iterator(source, spec, global_batch_size=4, mesh=_mesh(), seed=4)
  with pytest.raises(ValueError, match="seed: saved 3, now 4"):
    other.set_state(state)


def test_batches_equal_the_reference_preprocessing(built, tokenizer):
  out, _, expected = built
  source = open_source(str(out))
  by_size = _by_size(expected)
  for random_crop in (False, True):
    spec = DataSpec(resolution=R, random_crop=random_crop, clip=CLIP, tokenizer=tokenizer[0])
    batch = next(make_train_iterator(source, spec, global_batch_size=9, mesh=_mesh(), seed=1))
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
      "pixels": (jnp.float32, (9, R, R, 3)),
      "clip_pixels": (jnp.float32, (9, 30, 30, 3)),
      "input_ids": (jnp.int32, (9, 16)),
      "time_ids": (jnp.float32, (9, 6)),
    }
    for row, size in enumerate(_sizes(batch)):
      want = by_size[size]
      image = Image.fromarray(want["pixels"])
      np.testing.assert_array_equal(batch["clip_pixels"][row], clip_pixels([image], CLIP)[0])
      np.testing.assert_array_equal(
        batch["input_ids"][row], tokenize(tokenizer[0], want["text"])[0]
      )
      height, width, top, left, r1, r2 = np.asarray(batch["time_ids"][row]).astype(int)
      resized_w, resized_h = shortest_side_size(width, height, R)
      assert (r1, r2) == (R, R) and 0 <= top <= resized_h - R and 0 <= left <= resized_w - R
      if not random_crop:  # torchvision's centre: round((resized - R) / 2)
        assert (top, left) == (round((resized_h - R) / 2), round((resized_w - R) / 2))
        np.testing.assert_array_equal(batch["pixels"][row], vae_pixels(image, R))
      resized = image.resize((resized_w, resized_h), Image.Resampling.BILINEAR)
      crop = np.asarray(resized, np.float32)[top : top + R, left : left + R] / 127.5 - 1.0
      np.testing.assert_allclose(batch["pixels"][row], crop, atol=1e-6)
  centre = Image.fromarray(expected[0]["pixels"])
  h, w = expected[0]["size"]
  rw, rh = shortest_side_size(w, h, R)
  np.testing.assert_array_equal(
    crop_pixels(centre, R, round((rh - R) / 2), round((rw - R) / 2)), vae_pixels(centre, R)
  )


def test_feature_keys_are_configurable(built, tokenizer):
  out, _, expected = built
  source = open_source("image_text", data_dir=str(out))
  spec = DataSpec(
    resolution=R, random_crop=False, clip=None, tokenizer=tokenizer[0], caption_key="id"
  )
  batch = make_train_iterator(source, spec, global_batch_size=2, mesh=_mesh(), seed=0).next_local()
  for row, size in enumerate(_sizes(batch)):
    np.testing.assert_array_equal(
      batch["input_ids"][row], tokenize(tokenizer[0], _by_size(expected)[size]["id"])[0]
    )
  bad = DataSpec(
    resolution=R, random_crop=False, clip=None, tokenizer=tokenizer[0], caption_key="caption"
  )
  with pytest.raises(KeyError, match="no feature 'caption'"):
    make_train_iterator(source, bad, global_batch_size=2, mesh=_mesh(), seed=0)


MESH_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ipadapter_jax.data.batches import make_train_iterator
    from ipadapter_jax.data.input_pipeline import DataSpec, open_source
    from ipadapter_jax.preprocessing import CLIPImageConfig
    from ipadapter_jax.tokenizer import load_tokenizer
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = DataSpec(16, False, CLIPImageConfig(size=30, crop_size=(30, 30)),
                    load_tokenizer(sys.argv[2]))
    source = open_source(sys.argv[1])
    it = make_train_iterator(source, spec, global_batch_size=8, mesh=mesh, seed=1)
    local = make_train_iterator(source, spec, global_batch_size=8, mesh=mesh, seed=1)
    want = NamedSharding(mesh, P(("data", "fsdp")))
    for _ in range(3):
      batch, expected = next(it), local.next_local()
      for key, value in batch.items():
        assert value.sharding == want, (key, value.sharding)
        assert value.shape[0] == 8 and {s.data.shape[0] for s in value.addressable_shards} == {1}
        np.testing.assert_array_equal(np.asarray(value), expected[key])
    print("sharded", sorted(batch))
""")


def test_batches_are_sharded_over_an_eight_device_mesh(built, tokenizer, tmp_path):
  out, _, _ = built
  script = tmp_path / "mesh.py"
  script.write_text(MESH_SCRIPT)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, str(script), str(out), tokenizer[1]],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sharded ['clip_pixels', 'input_ids', 'pixels', 'time_ids']" in result.stdout


# ---------------------------------------------------------------------------------------------
# The embedding cache


@pytest.fixture(scope="module")
def sd15_folders(tmp_path_factory, tokenizer):
  """A tiny SD1.5-like folder and image encoder written by diffusers/transformers: (pipeline
  folder, image encoder folder)."""
  # pylint: disable=import-outside-toplevel
  import torch
  from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
  from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
  )

  tmp = tmp_path_factory.mktemp("sd15")
  with torch.no_grad():
    StableDiffusionPipeline(
      vae=ref.randomize_(AutoencoderKL(**ref.VAE_LIKE), 0),
      text_encoder=ref.randomize_(CLIPTextModel(CLIPTextConfig(**ref.TEXT_LIKE)), 1),
      tokenizer=tokenizer[0],
      unet=ref.tiny_unet(ref.SD15_LIKE, 2),
      scheduler=DDIMScheduler(),
      safety_checker=None,
      feature_extractor=None,
      requires_safety_checker=False,
    ).save_pretrained(tmp / "pipeline")
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**ref.VISION_LIKE))
    ref.randomize_(encoder, 3).save_pretrained(tmp / "image_encoder")
  CLIPImageProcessor(
    size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
  ).save_pretrained(tmp / "image_encoder")
  return str(tmp / "pipeline"), str(tmp / "image_encoder")


@pytest.fixture(scope="module")
def sd15(sd15_folders):
  """The tiny SD1.5-like models, loaded."""
  from ipadapter_jax.weights import load_stable_diffusion  # pylint: disable=import-outside-toplevel

  pipeline, image_encoder = sd15_folders
  return load_stable_diffusion(pipeline, image_encoder=image_encoder)


def _jit(fn, models: tuple, *inputs):
  """fn(*models, *inputs) compiled."""
  graphdef, state = nnx.split(models)
  return jax.jit(lambda s, *x: fn(*nnx.merge(graphdef, s), *x))(state, *inputs)


def _assert_close(actual, expected):
  err = float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))
  assert err <= 1e-5, f"max abs error {err:.3g}"


def test_cache_equals_the_encoders_run_on_the_fly(built, sd15, tmp_path):
  out, _, expected = built
  source = open_source(str(out))
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=None)
  report = build_embedding_cache(source, spec, sd15, str(tmp_path), batch_size=4)
  assert report.num_examples == 18 and report.settings["resolution"] == R
  assert report.shapes == {
    "latent_mean": (8, 8, 4),
    "latent_logvar": (8, 8, 4),
    "image_embeds": (24,),
    "text_context": (16, 32),
    "time_ids": (6,),
  }

  images = [Image.fromarray(e["pixels"]) for e in expected]
  pixels = np.stack([vae_pixels(image, R) for image in images])
  ids = tokenize(sd15.tokenizer, [e["text"] for e in expected] + [""])
  mean, logvar = _jit(lambda vae, x: vae.encode(x), (sd15.vae,), jnp.asarray(pixels))
  embeds = _jit(
    lambda enc, x: enc(x).image_embeds,
    (sd15.image_encoder,),
    jnp.asarray(clip_pixels(images, sd15.image_processor)),
  )
  context = _jit(lambda te, x: te(x).last_hidden_state, (sd15.text_encoder,), jnp.asarray(ids))

  cache = open_source(str(tmp_path))
  assert len(cache) == 18
  for i in range(18):
    record = cache[i]
    _assert_close(record["latent_mean"], mean[i])
    _assert_close(record["latent_logvar"], logvar[i])
    _assert_close(record["image_embeds"], embeds[i])
    _assert_close(record["text_context"], context[i])
  empty = load_empty_text(str(tmp_path))
  assert set(empty) == {"text_context"}
  _assert_close(empty["text_context"], context[-1])

  batch = next(make_train_iterator(cache, spec, global_batch_size=6, mesh=_mesh(), seed=0))
  assert {k: v.shape for k, v in batch.items()} == {
    "latent_mean": (6, 8, 8, 4),
    "latent_logvar": (6, 8, 8, 4),
    "image_embeds": (6, 24),
    "text_context": (6, 16, 32),
    "time_ids": (6, 6),
  }
  row = _by_size(expected)
  for j, size in enumerate(_sizes(batch)):
    i = expected.index(row[size])
    _assert_close(batch["latent_mean"][j], mean[i])
  with pytest.raises(ValueError, match="made at resolution 16, the spec asks for 32"):
    make_train_iterator(
      cache, DataSpec(32, False, None, None), global_batch_size=6, mesh=_mesh(), seed=0
    )


def _random(make, seed: int):
  """A model with normal random weights, without running its initialisers (fast)."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), state)
  return nnx.merge(graphdef, state)


def test_sdxl_cache_holds_both_text_encoders_and_hidden_states(built, tokenizer, tmp_path):
  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
  )
  from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig
  from ipadapter_jax.weights.stable_diffusion import StableDiffusion

  out, _, expected = built
  text = dict(
    vocab_size=140,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    eos_token_id=1,
  )
  rngs = lambda: nnx.Rngs(0)
  models = StableDiffusion(
    unet=None,
    scheduler_config={},
    tokenizer=tokenizer[0],
    tokenizer_2=tokenizer[0],
    vae=_random(
      lambda: AutoencoderKL(
        VAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4), rngs=rngs()
      ),
      0,
    ),
    text_encoder=_random(lambda: CLIPTextModel(CLIPTextConfig(**text), rngs=rngs()), 1),
    text_encoder_2=_random(
      lambda: CLIPTextModel(
        CLIPTextConfig(**dict(text, hidden_size=8, projection_dim=12)), rngs=rngs()
      ),
      2,
    ),
    image_encoder=_random(
      lambda: CLIPVisionModelWithProjection(
        CLIPVisionConfig(
          hidden_size=16,
          intermediate_size=24,
          num_hidden_layers=2,
          num_attention_heads=2,
          image_size=12,
          patch_size=6,
          projection_dim=10,
        ),
        rngs=rngs(),
      ),
      3,
    ),
    image_processor=CLIPImageConfig(size=12, crop_size=(12, 12)),
  )
  source = open_source(str(out))
  subset = [source[i] for i in range(3)]  # any random-access sequence of records is a source
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=None)
  report = build_embedding_cache(
    subset, spec, models, str(tmp_path), batch_size=2, image_features="hidden_states"
  )
  assert report.shapes["text_context"] == (16, 24) and report.shapes["text_pooled"] == (12,)
  assert report.shapes["image_hidden_states"] == (5, 16)

  images = [Image.fromarray(e["pixels"]) for e in expected[:3]]
  ids = tokenize(tokenizer[0], [e["text"] for e in expected[:3]] + [""])

  def text_states(te1, te2, x):
    first, second = te1(x), te2(x)
    return (
      jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], -1),
      second.text_embeds,
    )

  context, pooled = _jit(
    text_states, (models.text_encoder, models.text_encoder_2), jnp.asarray(ids)
  )
  hidden = _jit(
    lambda enc, x: enc(x).hidden_states[-2],
    (models.image_encoder,),
    jnp.asarray(clip_pixels(images, models.image_processor)),
  )
  cache = open_source(str(tmp_path))
  for i in range(3):
    _assert_close(cache[i]["text_context"], context[i])
    _assert_close(cache[i]["text_pooled"], pooled[i])
    _assert_close(cache[i]["image_hidden_states"], hidden[i])
  empty = load_empty_text(str(tmp_path))
  _assert_close(empty["text_context"], context[-1])
  _assert_close(empty["text_pooled"], pooled[-1])


def _records(source) -> list[dict[str, np.ndarray]]:
  return [source[i] for i in range(len(source))]


def test_cache_built_by_two_hosts_equals_one_host_and_resumes(built, sd15, tmp_path):
  """Each host writes its own parts, the last to finish the index; the cache is the same as one
  host's, and a build run again writes only the parts that are missing."""
  out, _, _ = built
  source = open_source(str(out))
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=None)
  build = lambda folder, **kw: build_embedding_cache(
    source, spec, sd15, str(tmp_path / folder), batch_size=4, examples_per_part=5, **kw
  )
  one = build("one")
  assert (one.complete, one.num_examples, one.parts_written) == (True, 18, 4)
  second = build("two", process_index=1, process_count=2)  # parts 1 and 3, no index yet
  assert not second.complete and second.num_examples == 5 + 3
  assert sorted(os.listdir(tmp_path / "two")) == [
    "part-00001.json",
    "part-00001.rows",
    "part-00003.json",
    "part-00003.rows",
  ]
  first = build("two", process_index=0, process_count=2)
  assert first.complete and first.num_examples == 18 and first.shapes == one.shapes
  for got, want in zip(
    _records(open_source(str(tmp_path / "two"))), _records(open_source(str(tmp_path / "one")))
  ):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(FileExistsError, match="already holds a complete embedding cache"):
    build("two", process_index=0, process_count=2)
  os.remove(tmp_path / "one" / "part-00002.json")  # a part that was being written
  os.remove(tmp_path / "one" / "cache.json")
  again = build("one")
  assert again.complete and again.parts_written == 1 and again.num_examples == 18


def test_cache_of_webdataset_shards_has_a_part_per_shard(built, sd15, tmp_path):
  """Each host encodes its own shards; the cache holds the records in shard order."""
  import tarfile  # pylint: disable=import-outside-toplevel

  out, _, _ = built
  source = open_source(str(out))
  records = _records(source)
  (tmp_path / "shards").mkdir()
  for shard, chunk in enumerate((records[:10], records[10:])):
    with tarfile.open(tmp_path / "shards" / f"{shard:05d}.tar", "w") as tar:
      for i, record in enumerate(chunk):
        for ext, data in (("png", record["image"]), ("txt", record["text"])):
          info = tarfile.TarInfo(f"{shard}{i:04d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=None)
  shards = open_source(str(tmp_path / "shards" / "{00000..00001}.tar"))
  for host in (1, 0):
    report = build_embedding_cache(
      shards,
      spec,
      sd15,
      str(tmp_path / "from_shards"),
      batch_size=4,
      process_index=host,
      process_count=2,
    )
    assert report.parts_written == 1 and report.complete == (host == 0)
  reference = build_embedding_cache(source, spec, sd15, str(tmp_path / "from_built"), batch_size=4)
  got = _records(open_source(str(tmp_path / "from_shards")))
  assert len(got) == reference.num_examples == 18
  for g, want in zip(got, _records(open_source(reference.dataset_dir))):
    for key in want:
      np.testing.assert_array_equal(g[key], want[key])


def test_bfloat16_cache_halves_the_arrays_and_trains_upcast(built, sd15, tmp_path):
  # pylint: disable=import-outside-toplevel
  import ml_dtypes

  from ipadapter_jax.data.cache_files import example_bytes

  out, _, _ = built
  source = open_source(str(out))
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=None)
  full = build_embedding_cache(source, spec, sd15, str(tmp_path / "f32"), batch_size=6)
  half = build_embedding_cache(
    source, spec, sd15, str(tmp_path / "bf16"), batch_size=6, dtype="bfloat16"
  )
  assert full.shapes == half.shapes and half.settings["dtype"] == "bfloat16"
  time_ids = 6 * 4  # float32 in both: image sizes over 256 are not exact in bfloat16
  f32, bf16 = example_bytes(full.shapes, "float32"), example_bytes(half.shapes, "bfloat16")
  assert bf16 - time_ids == (f32 - time_ids) // 2
  assert os.path.getsize(tmp_path / "bf16" / "part-00000.rows") == 18 * bf16
  cache_f32, cache_bf16 = open_source(str(tmp_path / "f32")), open_source(str(tmp_path / "bf16"))
  for key in ("latent_mean", "image_embeds", "text_context"):
    assert cache_bf16[3][key].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(cache_bf16[3][key], cache_f32[3][key].astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(cache_bf16[3]["time_ids"], cache_f32[3]["time_ids"])
  make = lambda cache: make_train_iterator(
    cache, spec, global_batch_size=6, mesh=_mesh(), seed=0
  ).next_local()
  got, want = make(cache_bf16), make(cache_f32)
  for key in want:
    assert got[key].dtype == np.float32
    np.testing.assert_array_equal(got[key], want[key].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_cache_written_to_and_trained_from_gcs(built, sd15, tmp_path, fake_gcs):  # noqa: F811
  out, _, _ = built
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=None)
  local = build_embedding_cache(
    open_source(str(out)), spec, sd15, str(tmp_path / "local"), batch_size=6, examples_per_part=8
  )
  remote = build_embedding_cache(
    open_source(str(out)), spec, sd15, "gs://bucket/cache", batch_size=6, examples_per_part=8
  )
  assert remote.complete and remote.dataset_dir == "gs://bucket/cache"
  assert "bucket/cache/cache.json" in fake_gcs.files() and not os.listdir(".")
  cache = open_source("gs://bucket/cache")
  for got, want in zip(_records(cache), _records(open_source(local.dataset_dir))):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  np.testing.assert_array_equal(
    load_empty_text("gs://bucket/cache")["text_context"],
    load_empty_text(local.dataset_dir)["text_context"],
  )
  # One batch, all there is: no reading thread is left running when gs:// stops answering.
  it = make_train_iterator(cache, spec, global_batch_size=18, mesh=_mesh(), seed=0, num_epochs=1)
  batch = it.next_local()
  assert sorted(map(tuple, batch["time_ids"])) == sorted(
    tuple(r["time_ids"]) for r in _records(cache)
  )


def test_caches_built_with_tfds_are_still_read(tmp_path):
  """Caches written before the part files (a TFDS ArrayRecord dataset) train as before."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  shapes = {
    "latent_mean": (2, 2, 4),
    "latent_logvar": (2, 2, 4),
    "image_embeds": (3,),
    "text_context": (4, 5),
    "time_ids": (6,),
  }
  examples = [
    {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()} for _ in range(4)
  ]

  class OldCache(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        metadata=tfds.core.MetadataDict(resolution=R),
        features=tfds.features.FeaturesDict(
          {
            k: tfds.features.Tensor(
              shape=v, dtype=np.float32, encoding=tfds.features.Encoding.BYTES
            )
            for k, v in shapes.items()
          }
        ),
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield from enumerate(examples)

  OldCache(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
    download_dir=str(tmp_path / "downloads")
  )
  np.savez(tmp_path / "old_cache" / "1.0.0" / "empty_text.npz", text_context=np.ones((4, 5)))
  cache = open_source(str(tmp_path))
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=None)
  batch = make_train_iterator(cache, spec, global_batch_size=4, mesh=_mesh(), seed=0).next_local()
  assert sorted(batch) == sorted(shapes)
  assert sorted(map(tuple, batch["time_ids"])) == sorted(tuple(e["time_ids"]) for e in examples)
  assert load_empty_text(str(tmp_path))["text_context"].shape == (4, 5)


def test_command_line_caches_in_bfloat16_on_one_of_two_hosts(built, sd15_folders, tmp_path, capsys):
  from ipadapter_jax.cli.data import main  # pylint: disable=import-outside-toplevel

  out, _, _ = built
  pipeline, image_encoder = sd15_folders
  common = [
    "cache",
    "--source",
    str(out),
    "--model",
    pipeline,
    "--image_encoder",
    image_encoder,
    "--out",
    str(tmp_path / "cache"),
    "--resolution",
    str(R),
    "--dtype",
    "bfloat16",
    "--batch_size",
    "6",
    "--examples_per_part",
    "6",
    "--process_count",
    "2",
  ]
  assert main(common + ["--process_index", "1"]) == 0
  assert "this host's parts hold 6 examples" in capsys.readouterr().out
  assert main(common + ["--process_index", "0"]) == 0
  assert "18 examples (bfloat16); per example image_embeds [24], latent_logvar [8, 8, 4]" in (
    capsys.readouterr().out
  )
  assert main(["inspect", str(tmp_path / "cache")]) == 0
  printed = capsys.readouterr().out
  assert "18 examples in 3 parts" in printed
  assert "feature text_context: [16, 32] bfloat16" in printed
  assert main(common + ["--process_index", "2"]) == 1
  assert capsys.readouterr().err.startswith("error: process_index 2 is not in [0, 2)")


def test_command_line_builds_and_inspects(folder, tmp_path, capsys):
  from ipadapter_jax.cli.data import main  # pylint: disable=import-outside-toplevel

  root, annotations, _ = folder
  assert (
    main(
      [
        "build",
        "--annotations",
        str(annotations),
        "--data_root",
        str(root),
        "--out",
        str(tmp_path / "ds"),
        "--name",
        "cli_data",
      ]
    )
    == 0
  )
  assert "18 examples from 20 annotations, 2 skipped" in capsys.readouterr().out
  assert (
    main(["inspect", str(tmp_path / "ds"), "--grid", str(tmp_path / "grid.png"), "--num", "8"]) == 0
  )
  printed = capsys.readouterr().out
  assert "split train: 18 examples" in printed and "[6] sub/07.png 46x38: ''" in printed
  with Image.open(tmp_path / "grid.png") as grid:
    assert grid.size == (3 * 160, 3 * (160 + 40))


# ---------------------------------------------------------------------------------------------
# Untrusted input


@pytest.mark.parametrize("image_file", ["../x.png", "/abs.png", "sub/../../x.png"])
def test_paths_leaving_the_data_root_are_refused(tmp_path, capsys, image_file):
  """Bug: a manifest entry naming an absolute path or one through '..' read a file outside the
  dataset folder into the dataset."""
  root = tmp_path / "root"
  os.makedirs(root / "sub")
  outside = tmp_path / "x.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "ok.png")
  entry = str(outside) if image_file == "/abs.png" else image_file
  (root / "data.json").write_text(
    json.dumps([{"image_file": "sub/../ok.png", "text": "a"}, {"image_file": entry, "text": "b"}])
  )
  with pytest.raises(
    ValueError,
    match=rf"data.json: entry 1: 'image_file' '{entry}' leaves the "
    "data root",
  ):
    build_image_text_dataset(str(root / "data.json"), str(root), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")  # refused before anything is written
  from ipadapter_jax.cli.data import main  # pylint: disable=import-outside-toplevel

  assert (
    main(
      [
        "build",
        "--annotations",
        str(root / "data.json"),
        "--data_root",
        str(root),
        "--out",
        str(tmp_path / "out"),
      ]
    )
    == 1
  )  # a run error: the file, not the flags
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "entry 1" in err[0], err


def test_build_skips_and_counts_bombs_and_truncated_images(tmp_path, monkeypatch, capsys):
  """Bugs: an image over PIL's pixel limit (under twice it PIL only warns) built into the
  dataset; a decompression bomb reported as a corrupt file; PIL's warnings printed."""
  from ipadapter_jax.cli.data import main  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # small real images stand in for bombs
  rng = np.random.default_rng(0)
  noise = lambda side: Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
  names = {"good.png": 20, "cut.png": 30, "warns.png": 40, "refused.png": 50}  # 1000 < 40*40
  for name, side in names.items():
    noise(side).save(tmp_path / name)
  data = (tmp_path / "cut.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
  (tmp_path / "data.json").write_text(json.dumps([{"image_file": n, "text": n} for n in names]))
  with warnings.catch_warnings():
    warnings.simplefilter("error", Image.DecompressionBombWarning)  # none may escape the build
    assert (
      main(
        [
          "build",
          "--annotations",
          str(tmp_path / "data.json"),
          "--data_root",
          str(tmp_path),
          "--out",
          str(tmp_path / "ds"),
        ]
      )
      == 0
    )
  printed = capsys.readouterr().out
  assert "1 examples from 4 annotations, 3 skipped (1 corrupt, 2 decompression bomb)" in printed, (
    printed
  )
  report = json.loads((tmp_path / "ds" / "image_text" / "1.0.0" / "build_report.json").read_text())
  reasons = {s["image_file"]: s["reason"] for s in report["skipped"]}
  assert reasons["cut.png"].startswith("corrupt: OSError")
  assert reasons["warns.png"].startswith("decompression bomb: 40x40 = 1600 pixels")
  assert reasons["refused.png"].startswith("decompression bomb: 2500 pixels")


def _with_bad_images(tiny_dataset, bad: dict[int, bytes]):
  """The tiny dataset's records as a list, with the image bytes of some records replaced."""
  source = open_source(tiny_dataset)
  records = [dict(source[i]) for i in range(len(source))]
  for index, data in bad.items():
    records[index]["image"] = data
  return records


def test_undecodable_records_are_skipped_counted_and_resumed_exactly(tiny_dataset):
  """Bugs: one undecodable image mid-training crashed the run (and every restart hit it again);
  a skip that shortens a batch (processes disagree on shapes) or that shifts the records later
  steps see; a skip count lost on resume."""
  valid = open_source(tiny_dataset)[9]["image"]
  bad = {5: b"\x89PNG garbage", 9: valid[: len(valid) // 2]}
  records = _with_bad_images(tiny_dataset, bad)
  spec = DataSpec(resolution=R, random_crop=True, clip=None, tokenizer=None)
  make = lambda **kw: make_train_iterator(
    records, spec, global_batch_size=8, mesh=_mesh(), seed=0, max_bad_records=4, **kw
  )
  stream = grain.MapDataset.range(32).shuffle(seed=0).repeat(None)
  order = [int(stream[p]) for p in range(64)]  # the source index at each stream position
  positions = [p for p in range(48) if order[p] in bad]
  assert any(p >= 32 for p in positions) and len({p // 8 for p in positions}) > 1
  it = make()
  batches, counts = [], []
  for _ in range(6):  # into the second epoch: each bad record is skipped once per epoch
    batches.append(it.next_local())
    counts.append(it.skipped_records)
  assert all(
    b["pixels"].shape == (8, R, R, 3) and set(b) == {"pixels", "time_ids"} for b in batches
  )
  assert counts == [sum(p < 8 * (k + 1) for p in positions) for k in range(6)]
  for p in positions:  # the slot holds the next decodable record of the stream, with its crop
    q = next(q for q in range(p + 1, 64) if order[q] not in bad)
    image = Image.open(io.BytesIO(records[order[q]]["image"]))
    top, left = crop_offsets(40, 40, R, np.random.default_rng([0, p]))
    np.testing.assert_array_equal(
      batches[p // 8]["pixels"][p % 8], crop_pixels(image, R, top, left)
    )
  good = make_train_iterator(
    open_source(tiny_dataset), spec, global_batch_size=8, mesh=_mesh(), seed=0
  )
  for k in range(6):  # every other slot as without the bad records
    want = good.next_local()["pixels"]
    rows = [r for r in range(8) if 8 * k + r not in positions]
    np.testing.assert_array_equal(batches[k]["pixels"][rows], want[rows])

  first_bad_batch = positions[0] // 8
  resumed = make()
  for _ in range(first_bad_batch + 1):
    next(resumed)
  state = json.loads(json.dumps(resumed.get_state()))
  restored = make()
  restored.set_state(state)
  assert restored.skipped_records == counts[first_bad_batch]
  for k in range(first_bad_batch + 1, 6):
    np.testing.assert_array_equal(restored.next_local()["pixels"], batches[k]["pixels"])
    assert restored.skipped_records == counts[k]


def test_too_many_undecodable_records_stop_with_one_line_naming_the_record(tiny_dataset):
  """Bug: past the limit, the error as a traceback from PIL, naming no record."""
  records = _with_bad_images(tiny_dataset, {5: b"garbage", 9: b"more garbage"})
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=None)
  order = [int(i) for i in grain.MapDataset.range(32).shuffle(seed=0)]
  second = max(order.index(5), order.index(9))  # the skip past the limit
  it = make_train_iterator(
    records, spec, global_batch_size=8, mesh=_mesh(), seed=0, max_bad_records=1
  )
  with pytest.raises(ValueError) as error:
    for _ in range(4):
      it.next_local()
  message = str(error.value)
  assert "\n" not in message and "more than max_bad_records=1" in message, message
  assert (
    f"stream position {second}, source record {order[second]}, "
    f"id '{order[second]}.png': not a readable image" in message
  ), message
  assert order.index(9) + 1 == order.index(5)  # two in a row: no substitute within the limit
  it = make_train_iterator(
    records, spec, global_batch_size=8, mesh=_mesh(), seed=0, max_bad_records=0
  )
  with pytest.raises(ValueError) as error:  # raised in grain's threads: str() is the line shown
    it.next_local()
  assert str(error.value) == (
    "stream position 7, source record 9, id '9.png': not a readable image (not an image format "
    "PIL knows); neither does any of the 1 records after it in the stream, more than "
    "max_bad_records=0"
  )
  with pytest.raises(ValueError, match="max_bad_records must be 0 or more"):
    make_train_iterator(
      records, spec, global_batch_size=8, mesh=_mesh(), seed=0, max_bad_records=-1
    )
