"""The `sample.py` command's flags: defaults and refused values (sampling itself: test_pipeline)."""

import json
import os

import pytest
from PIL import Image

from ipadapter_jax.cli.sample import build_parser, main as sample_main


def test_negative_prompt_defaults_to_none_as_in_diffusers():
  args = build_parser().parse_args(["--pretrained", "sd"])
  assert args.negative_prompt is None  # the pipeline then picks the empty text or SDXL's zeros
  assert build_parser().parse_args(["--pretrained", "sd", "--negative_prompt", ""]
                                   ).negative_prompt == ""


@pytest.mark.parametrize("flag,value", [("--scale", "nan"), ("--scale", "inf"),
                                        ("--scale", "-inf"), ("--guidance_scale", "nan")])
def test_a_non_finite_number_is_refused_in_one_line(tiny_world, tmp_path, capsys, flag, value):
  out = tmp_path / "grid.png"
  argv = ["--pretrained", str(tiny_world / "sd"),
          "--image_encoder", str(tiny_world / "adapter" / "image_encoder"),
          "--ip_adapter", str(tiny_world / "adapter" / "ip-adapter.safetensors"),
          "--image", str(tiny_world / "prompt.png"), "--num_inference_steps", "2",
          "--num_samples", "1", "--height", "32", "--width", "32", "--out", str(out),
          f"{flag}={value}"]  # "=": argparse reads a lone "-inf" as a flag
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
  return ["--pretrained", str(tiny_world / "sd"),
          "--image_encoder", str(tiny_world / "adapter" / "image_encoder"),
          "--ip_adapter", str(tiny_world / "adapter" / "ip-adapter.safetensors"),
          "--image", str(tiny_world / "prompt.png"), "--num_inference_steps", "2",
          "--num_samples", "1", "--height", "32", "--width", "32", "--out", str(out), *extra]


def _no_model_loads(monkeypatch):
  import ipadapter_jax.weights  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(ipadapter_jax.weights, "load_stable_diffusion",
                      lambda *a, **k: pytest.fail("a model was loaded before --out was checked"))


@pytest.mark.parametrize("existing,flags", [("grid.png", []), ("grid.json", []),
                                            ("images.npy", ["--save_array", "images.npy"])])
def test_an_existing_output_is_refused_before_any_model_loads(tiny_world, tmp_path, capsys,
                                                              monkeypatch, existing, flags):
  """Catches sample.py sampling for minutes and then replacing a user's file (the grid, the
  settings .json beside it, or --save_array's)."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / existing).write_bytes(b"mine")
  _no_model_loads(monkeypatch)
  capsys.readouterr()
  assert sample_main(_argv(tiny_world, "grid.png", *flags)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and existing in err[0] and "--overwrite" in err[0], err
  assert sorted(os.listdir(tmp_path)) == [existing]
  assert (tmp_path / existing).read_bytes() == b"mine"


@pytest.mark.parametrize("out,problem", [("grid.txt", "not an image file name"),
                                         ("gs:/bucket/grid.png", "malformed URL"),
                                         ("foo://bucket/grid.png", "unsupported URL scheme")])
def test_an_out_that_cannot_be_written_is_refused_before_any_model_loads(
    tiny_world, tmp_path, capsys, monkeypatch, out, problem):
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
