"""The `sample.py` command's flags: defaults and refused values (sampling itself: test_pipeline)."""

import pytest

from ipadapter_jax.sampling import build_parser, main as sample_main


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
