"""The `sample.py` command's flags: defaults and refused values (sampling itself: test_pipeline)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.cli.sample import _image_paths, build_parser, check_outputs
from ipadapter_jax.cli.sample import main as sample_main


def test_negative_prompt_defaults_to_none_as_in_diffusers():
  args = build_parser().parse_args(["--pretrained", "sd"])
  assert args.negative_prompt is None  # the pipeline then picks the empty text or SDXL's zeros
  assert (
    build_parser().parse_args(["--pretrained", "sd", "--negative_prompt", ""]).negative_prompt == ""
  )


@pytest.mark.parametrize(
  "flag,value",
  [("--scale", "nan"), ("--scale", "inf"), ("--scale", "-inf"), ("--guidance_scale", "nan")],
)
def test_a_non_finite_number_is_refused_in_one_line(tiny_world, tmp_path, capsys, flag, value):
  out = tmp_path / "grid.png"
  argv = [
    "--pretrained",
    str(tiny_world / "sd"),
    "--image_encoder",
    str(tiny_world / "adapter" / "image_encoder"),
    "--ip_adapter",
    str(tiny_world / "adapter" / "ip-adapter.safetensors"),
    "--image",
    str(tiny_world / "prompt.png"),
    "--num_inference_steps",
    "2",
    "--num_samples",
    "1",
    "--height",
    "32",
    "--width",
    "32",
    "--out",
    str(out),
    f"{flag}={value}",
  ]  # "=": argparse reads a lone "-inf" as a flag
  capsys.readouterr()
  assert sample_main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  name = flag[2:]
  assert err[0].startswith("error:") and f"{name} must be finite" in err[0], err
  assert value in err[0], err
  if name == "scale":
    assert "guidance_scale" not in err[0], err
  assert not out.exists() and not out.with_suffix(".json").exists()


def _argv(tiny_world, out, *extra):
  return [
    "--pretrained",
    str(tiny_world / "sd"),
    "--image_encoder",
    str(tiny_world / "adapter" / "image_encoder"),
    "--ip_adapter",
    str(tiny_world / "adapter" / "ip-adapter.safetensors"),
    "--image",
    str(tiny_world / "prompt.png"),
    "--num_inference_steps",
    "2",
    "--num_samples",
    "1",
    "--height",
    "32",
    "--width",
    "32",
    "--out",
    str(out),
    *extra,
  ]


def _no_model_loads(monkeypatch):
  import ipadapter_jax.weights  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(
    ipadapter_jax.weights,
    "load_stable_diffusion",
    lambda *a, **k: pytest.fail("a model was loaded before --out was checked"),
  )


@pytest.mark.parametrize(
  "existing,flags",
  [
    ("grid.png", []),
    ("grid.json", []),
    ("grid_0.png", []),
    ("images.npy", ["--save_array", "images.npy"]),
  ],
)
def test_an_existing_output_is_refused_before_any_model_loads(
  tiny_world, tmp_path, capsys, monkeypatch, existing, flags
):
  """Catches sample.py sampling for minutes and then replacing a user's file (the grid, the
  settings .json or an image file beside it, or --save_array's)."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / existing).write_bytes(b"mine")
  _no_model_loads(monkeypatch)
  capsys.readouterr()
  assert sample_main(_argv(tiny_world, "grid.png", *flags)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and existing in err[0] and "--overwrite" in err[0], err
  assert sorted(os.listdir(tmp_path)) == [existing]
  assert (tmp_path / existing).read_bytes() == b"mine"


@pytest.mark.parametrize(
  "out,problem",
  [
    ("grid.txt", "not an image file name"),
    ("gs:/bucket/grid.png", "malformed URL"),
    ("foo://bucket/grid.png", "unsupported URL scheme"),
  ],
)
def test_an_out_that_cannot_be_written_is_refused_before_any_model_loads(
  tiny_world, tmp_path, capsys, monkeypatch, out, problem
):
  monkeypatch.chdir(tmp_path)
  _no_model_loads(monkeypatch)
  capsys.readouterr()
  assert sample_main(_argv(tiny_world, out)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and problem in err[0] and out in err[0], err
  assert os.listdir(tmp_path) == []


def test_overwrite_replaces_the_grid_and_its_settings(tiny_world, tmp_path, capsys):
  out = tmp_path / "grid.png"
  out.write_bytes(b"mine")
  out.with_suffix(".json").write_text("{}")
  assert sample_main(_argv(tiny_world, out, "--overwrite")) == 0
  assert f"wrote {out}" in capsys.readouterr().out
  assert Image.open(out).size == (32, 32)
  assert json.loads(out.with_suffix(".json").read_text())["num_samples"] == 1
  assert Image.open(tmp_path / "grid_0.png").size == (32, 32)


def test_each_image_is_written_beside_the_grid_and_listed(tiny_world, tmp_path, capsys):
  """Catches per-image files missing, out of order, unlike the grid's tiles, or not listed in the
  settings."""
  out = tmp_path / "grid.png"
  argv = _argv(tiny_world, out, "--save_array", str(tmp_path / "images.npy"))
  argv[argv.index("--num_samples") + 1] = "2"
  assert sample_main(argv) == 0
  assert f"each image also as {tmp_path / 'grid_0.png'}" in capsys.readouterr().out
  files = [str(tmp_path / "grid_0.png"), str(tmp_path / "grid_1.png")]
  assert json.loads(out.with_suffix(".json").read_text())["image_files"] == files
  array = np.load(tmp_path / "images.npy")
  grid = np.asarray(Image.open(out).convert("RGB"))
  for k, path in enumerate(files):
    image = np.asarray(Image.open(path))
    np.testing.assert_array_equal(image, np.round(array[k] * 255).astype(np.uint8))
    np.testing.assert_array_equal(image, grid[:, 32 * k : 32 * (k + 1)])
  assert not np.array_equal(array[0], array[1])


def test_grid_only_writes_no_image_files(tiny_world, tmp_path, monkeypatch):
  """Catches --grid_only still claiming (and refusing over) the per-image files."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "grid_1.png").write_bytes(b"mine")
  argv = _argv(tiny_world, "grid.png", "--num_samples", "2")
  with pytest.raises(ValueError, match="grid_1.png"):
    check_outputs(build_parser().parse_args(argv))
  args = build_parser().parse_args(argv + ["--grid_only"])
  check_outputs(args)
  assert _image_paths(args) == []
  assert _image_paths(build_parser().parse_args(argv)) == ["grid_0.png", "grid_1.png"]
