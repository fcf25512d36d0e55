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

from ipadapter_jax.data.cache import build_embedding_cache, load_empty_text
from ipadapter_jax.data.image_text import build_image_text_dataset, read_annotations
from ipadapter_jax.data.input_pipeline import (DataSpec, crop_offsets, crop_pixels, decode_image,
                                               decode_text, make_train_iterator, open_source)
from ipadapter_jax.preprocessing import (CLIPImageConfig, clip_pixels, shortest_side_size,
                                              to_rgb, vae_pixels)
from ipadapter_jax.tokenizer import load_tokenizer, tokenize, write_word_tokenizer
from tests import torch_reference as ref

R = 16  # VAE resolution in these tests
CLIP = CLIPImageConfig(size=30, crop_size=(30, 30))  # VISION_LIKE's image size
CAPTIONS = ["a red circle", "a green square on a blue background", "photo of a blue circle",
            "a square", "red on green", "photo of a red square on a green background"]
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
      (root / name).write_bytes(data[:len(data) // 2])  # truncated
      continue
    with Image.open(root / name) as reread:  # what decoding the stored file must give
      expected.append({"id": name, "text": caption,
                       "pixels": np.asarray(to_rgb(reread)), "size": (height, width)})
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
  assert read_annotations(str(path)) == [{"image_file": "a.jpg", "text": "one"},
                                         {"image_file": "b.png", "text": ""}]
  path.write_text('{"image_file": "a.jpg", "text": "one"}\n{"image_file": "b.png"}\n')
  with pytest.raises(ValueError, match=r"data.jsonl: line 2: 'text' is missing"):
    read_annotations(str(path))
  with pytest.raises(FileNotFoundError, match="no such dataset folder"):
    open_source(str(tmp_path / "nothing" / "here"))


def test_tfrecord_dataset_without_tensorflow_is_explained(built, tmp_path):
  try:
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
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
    it = make_train_iterator(source, spec, global_batch_size=6, mesh=_mesh(), seed=seed,
                             num_epochs=1, process_index=process_index,
                             process_count=process_count, **kw)
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

  it = make_train_iterator(source, spec, global_batch_size=6, mesh=_mesh(), seed=7,
                           num_epochs=2)  # one process: epochs are shuffled differently
  first = [s for _ in range(3) for s in _sizes(it.next_local())]
  second = [s for _ in range(3) for s in _sizes(it.next_local())]
  assert sorted(first) == sorted(second) == sorted(_by_size(expected)) and first != second


def test_restored_iterator_continues_with_the_next_batch(built, tokenizer):
  out, _, _ = built
  source = open_source(str(out))
  spec = DataSpec(resolution=R, random_crop=True, clip=CLIP, tokenizer=tokenizer[0],
                  tokenizer_2=tokenizer[0])
  make = lambda **kw: make_train_iterator(source, spec, global_batch_size=4, mesh=_mesh(),
                                          seed=3, **kw)
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
    assert set(got) == set(want) == {"pixels", "clip_pixels", "input_ids", "input_ids_2",
                                     "time_ids"}
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
        "pixels": (jnp.float32, (9, R, R, 3)), "clip_pixels": (jnp.float32, (9, 30, 30, 3)),
        "input_ids": (jnp.int32, (9, 16)), "time_ids": (jnp.float32, (9, 6))}
    for row, size in enumerate(_sizes(batch)):
      want = by_size[size]
      image = Image.fromarray(want["pixels"])
      np.testing.assert_array_equal(batch["clip_pixels"][row], clip_pixels([image], CLIP)[0])
      np.testing.assert_array_equal(batch["input_ids"][row],
                                    tokenize(tokenizer[0], want["text"])[0])
      height, width, top, left, r1, r2 = np.asarray(batch["time_ids"][row]).astype(int)
      resized_w, resized_h = shortest_side_size(width, height, R)
      assert (r1, r2) == (R, R) and 0 <= top <= resized_h - R and 0 <= left <= resized_w - R
      if not random_crop:  # torchvision's centre: round((resized - R) / 2)
        assert (top, left) == (round((resized_h - R) / 2), round((resized_w - R) / 2))
        np.testing.assert_array_equal(batch["pixels"][row], vae_pixels(image, R))
      resized = image.resize((resized_w, resized_h), Image.Resampling.BILINEAR)
      crop = np.asarray(resized, np.float32)[top:top + R, left:left + R] / 127.5 - 1.0
      np.testing.assert_allclose(batch["pixels"][row], crop, atol=1e-6)
  centre = Image.fromarray(expected[0]["pixels"])
  h, w = expected[0]["size"]
  rw, rh = shortest_side_size(w, h, R)
  np.testing.assert_array_equal(crop_pixels(centre, R, round((rh - R) / 2), round((rw - R) / 2)),
                                vae_pixels(centre, R))


def test_feature_keys_are_configurable(built, tokenizer):
  out, _, expected = built
  source = open_source("image_text", data_dir=str(out))
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=tokenizer[0],
                  caption_key="id")
  batch = make_train_iterator(source, spec, global_batch_size=2, mesh=_mesh(), seed=0).next_local()
  for row, size in enumerate(_sizes(batch)):
    np.testing.assert_array_equal(batch["input_ids"][row],
                                  tokenize(tokenizer[0], _by_size(expected)[size]["id"])[0])
  bad = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=tokenizer[0],
                 caption_key="caption")
  with pytest.raises(KeyError, match="no feature 'caption'"):
    make_train_iterator(source, bad, global_batch_size=2, mesh=_mesh(), seed=0)


MESH_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ipadapter_jax.data.input_pipeline import DataSpec, make_train_iterator, open_source
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
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(script), str(out), tokenizer[1]], env=env,
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sharded ['clip_pixels', 'input_ids', 'pixels', 'time_ids']" in result.stdout


# ---------------------------------------------------------------------------------------------
# The embedding cache


@pytest.fixture(scope="module")
def sd15(tmp_path_factory, tokenizer):
  """A tiny SD1.5-like folder and image encoder written by diffusers/transformers, loaded."""
  # pylint: disable=import-outside-toplevel
  import torch
  from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
  from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                            CLIPVisionModelWithProjection)
  from ipadapter_jax.weights import load_stable_diffusion
  tmp = tmp_path_factory.mktemp("sd15")
  with torch.no_grad():
    StableDiffusionPipeline(
        vae=ref.randomize_(AutoencoderKL(**ref.VAE_LIKE), 0),
        text_encoder=ref.randomize_(CLIPTextModel(CLIPTextConfig(**ref.TEXT_LIKE)), 1),
        tokenizer=tokenizer[0], unet=ref.tiny_unet(ref.SD15_LIKE, 2), scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(tmp / "pipeline")
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**ref.VISION_LIKE))
    ref.randomize_(encoder, 3).save_pretrained(tmp / "image_encoder")
  CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
                     ).save_pretrained(tmp / "image_encoder")
  return load_stable_diffusion(str(tmp / "pipeline"), image_encoder=str(tmp / "image_encoder"))


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
  assert report.shapes == {"latent_mean": (8, 8, 4), "latent_logvar": (8, 8, 4),
                           "image_embeds": (24,), "text_context": (16, 32), "time_ids": (6,)}

  images = [Image.fromarray(e["pixels"]) for e in expected]
  pixels = np.stack([vae_pixels(image, R) for image in images])
  ids = tokenize(sd15.tokenizer, [e["text"] for e in expected] + [""])
  mean, logvar = _jit(lambda vae, x: vae.encode(x), (sd15.vae,), jnp.asarray(pixels))
  embeds = _jit(lambda enc, x: enc(x).image_embeds, (sd15.image_encoder,),
                jnp.asarray(clip_pixels(images, sd15.image_processor)))
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
      "latent_mean": (6, 8, 8, 4), "latent_logvar": (6, 8, 8, 4), "image_embeds": (6, 24),
      "text_context": (6, 16, 32), "time_ids": (6, 6)}
  row = _by_size(expected)
  for j, size in enumerate(_sizes(batch)):
    i = expected.index(row[size])
    _assert_close(batch["latent_mean"][j], mean[i])
  with pytest.raises(ValueError, match="made at resolution 16, the spec asks for 32"):
    make_train_iterator(cache, DataSpec(32, False, None, None), global_batch_size=6,
                        mesh=_mesh(), seed=0)


def _random(make, seed: int):
  """A model with normal random weights, without running its initialisers (fast)."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), state)
  return nnx.merge(graphdef, state)


def test_sdxl_cache_holds_both_text_encoders_and_hidden_states(built, tokenizer, tmp_path):
  # pylint: disable=import-outside-toplevel
  from ipadapter_jax.models.clip import (CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                                         CLIPVisionModelWithProjection)
  from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig
  from ipadapter_jax.weights.stable_diffusion import StableDiffusion
  out, _, expected = built
  text = dict(vocab_size=140, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=16, eos_token_id=1)
  rngs = lambda: nnx.Rngs(0)
  models = StableDiffusion(
      unet=None, scheduler_config={}, tokenizer=tokenizer[0], tokenizer_2=tokenizer[0],
      vae=_random(lambda: AutoencoderKL(VAEConfig(block_out_channels=(8,), layers_per_block=1,
                                                  norm_num_groups=4), rngs=rngs()), 0),
      text_encoder=_random(lambda: CLIPTextModel(CLIPTextConfig(**text), rngs=rngs()), 1),
      text_encoder_2=_random(lambda: CLIPTextModel(
          CLIPTextConfig(**dict(text, hidden_size=8, projection_dim=12)), rngs=rngs()), 2),
      image_encoder=_random(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
          hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
          image_size=12, patch_size=6, projection_dim=10), rngs=rngs()), 3),
      image_processor=CLIPImageConfig(size=12, crop_size=(12, 12)))
  source = open_source(str(out))
  subset = [source[i] for i in range(3)]  # any random-access sequence of records is a source
  spec = DataSpec(resolution=R, random_crop=False, clip=None, tokenizer=None)
  report = build_embedding_cache(subset, spec, models, str(tmp_path), batch_size=2,
                                 image_features="hidden_states")
  assert report.shapes["text_context"] == (16, 24) and report.shapes["text_pooled"] == (12,)
  assert report.shapes["image_hidden_states"] == (5, 16)

  images = [Image.fromarray(e["pixels"]) for e in expected[:3]]
  ids = tokenize(tokenizer[0], [e["text"] for e in expected[:3]] + [""])
  def text_states(te1, te2, x):
    first, second = te1(x), te2(x)
    return (jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], -1),
            second.text_embeds)
  context, pooled = _jit(text_states, (models.text_encoder, models.text_encoder_2),
                         jnp.asarray(ids))
  hidden = _jit(lambda enc, x: enc(x).hidden_states[-2], (models.image_encoder,),
                jnp.asarray(clip_pixels(images, models.image_processor)))
  cache = open_source(str(tmp_path))
  for i in range(3):
    _assert_close(cache[i]["text_context"], context[i])
    _assert_close(cache[i]["text_pooled"], pooled[i])
    _assert_close(cache[i]["image_hidden_states"], hidden[i])
  empty = load_empty_text(str(tmp_path))
  _assert_close(empty["text_context"], context[-1])
  _assert_close(empty["text_pooled"], pooled[-1])


def test_command_line_builds_and_inspects(folder, tmp_path, capsys):
  from ipadapter_jax.data.__main__ import main  # pylint: disable=import-outside-toplevel
  root, annotations, _ = folder
  assert main(["build", "--annotations", str(annotations), "--data_root", str(root),
               "--out", str(tmp_path / "ds"), "--name", "cli_data"]) == 0
  assert "18 examples from 20 annotations, 2 skipped" in capsys.readouterr().out
  assert main(["inspect", str(tmp_path / "ds"), "--grid", str(tmp_path / "grid.png"),
               "--num", "8"]) == 0
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
  (root / "data.json").write_text(json.dumps([{"image_file": "sub/../ok.png", "text": "a"},
                                              {"image_file": entry, "text": "b"}]))
  with pytest.raises(ValueError, match=rf"data.json: entry 1: 'image_file' '{entry}' leaves the "
                                       "data root"):
    build_image_text_dataset(str(root / "data.json"), str(root), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")  # refused before anything is written
  from ipadapter_jax.data.__main__ import main  # pylint: disable=import-outside-toplevel
  assert main(["build", "--annotations", str(root / "data.json"), "--data_root", str(root),
               "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "entry 1" in err[0], err


def test_build_skips_and_counts_bombs_and_truncated_images(tmp_path, monkeypatch, capsys):
  """Bugs: an image over PIL's pixel limit (under twice it PIL only warns) built into the
  dataset; a decompression bomb reported as a corrupt file; PIL's warnings printed."""
  from ipadapter_jax.data.__main__ import main  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # small real images stand in for bombs
  rng = np.random.default_rng(0)
  noise = lambda side: Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
  names = {"good.png": 20, "cut.png": 30, "warns.png": 40, "refused.png": 50}  # 1000 < 40*40
  for name, side in names.items():
    noise(side).save(tmp_path / name)
  data = (tmp_path / "cut.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
  (tmp_path / "data.json").write_text(json.dumps([{"image_file": n, "text": n} for n in names]))
  with warnings.catch_warnings():
    warnings.simplefilter("error", Image.DecompressionBombWarning)  # none may escape the build
    assert main(["build", "--annotations", str(tmp_path / "data.json"), "--data_root",
                 str(tmp_path), "--out", str(tmp_path / "ds")]) == 0
  printed = capsys.readouterr().out
  assert ("1 examples from 4 annotations, 3 skipped (1 corrupt, 2 decompression bomb)"
          in printed), printed
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
  bad = {5: b"\x89PNG garbage", 9: valid[:len(valid) // 2]}
  records = _with_bad_images(tiny_dataset, bad)
  spec = DataSpec(resolution=R, random_crop=True, clip=None, tokenizer=None)
  make = lambda **kw: make_train_iterator(records, spec, global_batch_size=8, mesh=_mesh(),
                                          seed=0, max_bad_records=4, **kw)
  stream = grain.MapDataset.range(32).shuffle(seed=0).repeat(None)
  order = [int(stream[p]) for p in range(64)]  # the source index at each stream position
  positions = [p for p in range(48) if order[p] in bad]
  assert any(p >= 32 for p in positions) and len({p // 8 for p in positions}) > 1
  it = make()
  batches, counts = [], []
  for _ in range(6):  # into the second epoch: each bad record is skipped once per epoch
    batches.append(it.next_local())
    counts.append(it.skipped_records)
  assert all(b["pixels"].shape == (8, R, R, 3) and set(b) == {"pixels", "time_ids"}
             for b in batches)
  assert counts == [sum(p < 8 * (k + 1) for p in positions) for k in range(6)]
  for p in positions:  # the slot holds the next decodable record of the stream, with its crop
    q = next(q for q in range(p + 1, 64) if order[q] not in bad)
    image = Image.open(io.BytesIO(records[order[q]]["image"]))
    top, left = crop_offsets(40, 40, R, np.random.default_rng([0, p]))
    np.testing.assert_array_equal(batches[p // 8]["pixels"][p % 8],
                                  crop_pixels(image, R, top, left))
  good = make_train_iterator(open_source(tiny_dataset), spec, global_batch_size=8, mesh=_mesh(),
                             seed=0)
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
  it = make_train_iterator(records, spec, global_batch_size=8, mesh=_mesh(), seed=0,
                           max_bad_records=1)
  with pytest.raises(ValueError) as error:
    for _ in range(4):
      it.next_local()
  message = str(error.value)
  assert "\n" not in message and "more than max_bad_records=1" in message, message
  assert (f"stream position {second}, source record {order[second]}, "
          f"id '{order[second]}.png': not a readable image" in message), message
  assert order.index(9) + 1 == order.index(5)  # two in a row: no substitute within the limit
  it = make_train_iterator(records, spec, global_batch_size=8, mesh=_mesh(), seed=0,
                           max_bad_records=0)
  with pytest.raises(ValueError) as error:  # raised in grain's threads: str() is the line shown
    it.next_local()
  assert str(error.value) == (
      "stream position 7, source record 9, id '9.png': not a readable image (not an image format "
      "PIL knows); neither does any of the 1 records after it in the stream, more than "
      "max_bad_records=0")
  with pytest.raises(ValueError, match="max_bad_records must be 0 or more"):
    make_train_iterator(records, spec, global_batch_size=8, mesh=_mesh(), seed=0,
                        max_bad_records=-1)
