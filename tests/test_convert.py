"""IP-Adapter weights both ways (official files <-> JAX), the Plus and Full-face projections, base
model export, and the conversion CLI."""

import copy
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from diffusers.models.embeddings import IPAdapterFullImageProjection, IPAdapterPlusImageProjection
from flax import nnx
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ipadapter_jax.cli import convert
from ipadapter_jax.models import AdapterConfig, AdapterParam, UNet2DConditionModel, UNetConfig
from ipadapter_jax.models.image_proj import make_image_projection
from ipadapter_jax.models.released import SD15_UNET, SDXL_UNET
from ipadapter_jax.tokenizer import write_word_tokenizer
from ipadapter_jax.weights import (
  CheckpointError,
  load_ip_adapter,
  load_unet,
  read_ip_adapter,
  save_ip_adapter,
)
from ipadapter_jax.weights.tables import assign, named_variables, torch_name
from tests import torch_reference as ref

E = 40  # CLIP embedding width (basic) or hidden width (plus, full_face) in the tiny tests
PLUS = dict(num_tokens=16, resampler_dim=64, heads=1)


def _official(torch_unet, kind, seed=7):
  kw = dict(PLUS) if kind == "plus" else {}
  return ref.official_adapter(torch_unet, kw.pop("num_tokens", 4), E, seed, kind=kind, **kw)


def _flat(nested):
  return {f"{s}.{k}": v for s, d in nested.items() for k, v in d.items()}


def _projection_parity(unet_folders, kind, adapter, state, inputs):
  """Our projection vs diffusers' (built by its own converter from the official weights)."""
  torch_proj = (
    unet_folders["sd15"][0]
    ._convert_ip_adapter_image_proj_to_diffusers(state, low_cpu_mem_usage=False)
    .eval()
  )
  model = make_image_projection(adapter, 32, rngs=nnx.Rngs(0))
  assign(named_variables(model, torch_name, AdapterParam), ref.to_numpy(state), source=kind)
  with torch.no_grad():
    expected = torch_proj(inputs).numpy()
  return torch_proj, ref.assert_close(model(jnp.asarray(inputs.numpy())), expected, rel=1e-5)


def test_resampler_matches_diffusers(unet_folders):
  state = ref.official_image_proj("plus", E, 32, **PLUS, seed=1)
  adapter = AdapterConfig(num_tokens=16, embed_dim=E, kind="plus", resampler_dim=64)
  torch_proj, err = _projection_parity(unet_folders, "plus", adapter, state, torch.randn(2, 9, E))
  assert isinstance(torch_proj, IPAdapterPlusImageProjection)
  print(f"resampler: max abs error {err:.1e}")


def test_full_face_projection_matches_diffusers(unet_folders):
  state = ref.official_image_proj("full_face", E, 32, seed=2)
  adapter = AdapterConfig(embed_dim=E, kind="full_face")
  torch_proj, err = _projection_parity(
    unet_folders, "full_face", adapter, state, torch.randn(2, 9, E)
  )
  assert isinstance(torch_proj, IPAdapterFullImageProjection)
  print(f"full-face projection: max abs error {err:.1e}")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind", ["basic", "plus", "full_face"])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_official_round_trip_is_bit_exact(unet_folders, tmp_path, family, kind, suffix):
  torch_unet, folder = unet_folders[family]
  nested = {s: {k: v.half() for k, v in d.items()} for s, d in _official(torch_unet, kind).items()}
  source = str(tmp_path / f"in{suffix}")
  if suffix == ".bin":
    torch.save(nested, source)
  else:
    save_file(_flat(nested), source)
  model = load_unet(folder, ip_adapter=source)
  out = str(tmp_path / f"out{suffix}")
  save_ip_adapter(model, out, dtype=np.float16)
  original, written = read_ip_adapter(source), read_ip_adapter(out)
  assert set(written) == set(original)
  for key, value in original.items():
    assert written[key].dtype == value.dtype and written[key].shape == value.shape, key
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  if suffix == ".bin":  # the nested layout the official IPAdapter classes read
    raw = torch.load(out, weights_only=True)
    assert set(raw) == {"image_proj", "ip_adapter"} and "1.to_k_ip.weight" in raw["ip_adapter"]


def _tiny_pipeline(tmp_path, unet):
  write_word_tokenizer(str(tmp_path / "words"), ref.WORDS, model_max_length=16)
  return StableDiffusionPipeline(
    vae=ref.randomize_(AutoencoderKL(**ref.VAE_LIKE), 0),
    text_encoder=ref.randomize_(CLIPTextModel(CLIPTextConfig(**ref.TEXT_LIKE)), 1),
    tokenizer=CLIPTokenizer.from_pretrained(str(tmp_path / "words")),
    unet=unet,
    scheduler=DDIMScheduler(),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )


@pytest.mark.parametrize("kind", ["basic", "plus"])
def test_export_loads_in_diffusers_load_ip_adapter(unet_folders, tmp_path, kind):
  torch_unet, folder = unet_folders["sd15"]
  adapter = (
    AdapterConfig(num_tokens=16, embed_dim=E, kind="plus", resampler_dim=64)
    if kind == "plus"
    else AdapterConfig(num_tokens=4, embed_dim=E)
  )
  model = load_unet(folder, adapter=adapter)
  for _, variable in nnx.to_flat_state(nnx.state(model, AdapterParam)):  # move off the init
    value = variable.get_value()
    variable.set_value(value + 0.05 * jnp.sin(jnp.arange(value.size).reshape(value.shape)))
  save_ip_adapter(model, str(tmp_path / "adapter.safetensors"), dtype=np.float32)

  pipe = _tiny_pipeline(tmp_path, copy.deepcopy(torch_unet))
  pipe.load_ip_adapter(
    str(tmp_path), subfolder="", weight_name="adapter.safetensors", image_encoder_folder=None
  )
  g = torch.Generator().manual_seed(0)
  x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([900, 20])
  ctx = torch.randn(2, 77, 32, generator=g)
  features = torch.randn(*((2, E) if kind == "basic" else (2, 9, E)), generator=g)
  with torch.no_grad():
    expected = pipe.unet(
      x, t, ctx, added_cond_kwargs={"image_embeds": [features[:, None]]}
    ).sample.numpy()
  actual = ref.jit_call(
    model,
    jnp.asarray(x.numpy()),
    jnp.asarray(t.numpy()),
    jnp.asarray(ctx.numpy()),
    image_embeds=jnp.asarray(features.numpy()),
    layout="NCHW",
  )
  err = ref.assert_close(actual, expected)
  print(f"{kind} adapter exported and loaded by diffusers: max abs error {err:.1e}")


def test_real_sizes_by_shape():
  def adapter_params(raw, adapter):
    model = nnx.eval_shape(
      lambda: UNet2DConditionModel(
        UNetConfig.from_diffusers(raw), adapter=adapter, rngs=nnx.Rngs(0)
      )
    )
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, AdapterParam)))

  plus = AdapterConfig(num_tokens=16, embed_dim=1280, kind="plus", resampler_dim=768)
  assert adapter_params(SD15_UNET, plus) == 49_087_488
  assert adapter_params(SDXL_UNET, AdapterConfig(num_tokens=4, embed_dim=1024)) == 349_188_096


def _write(tmp_path, name, flat):
  path = str(tmp_path / name)
  save_file({k: v.contiguous() for k, v in flat.items()}, path)
  return path


def test_bad_files_name_the_offending_key(unet_folders, tmp_path):
  torch_unet, folder = unet_folders["sd15"]
  good = _flat(_official(torch_unet, "basic"))
  model = load_unet(folder, adapter=AdapterConfig(4, E))

  fewer = {k: v for k, v in good.items() if not k.startswith("ip_adapter.21.")}
  with pytest.raises(
    CheckpointError,
    match=r"10 cross-attention layers for a UNet with 11 "
    r"\(first offending key 'ip_adapter.21.to_k_ip.weight'\)",
  ):
    load_ip_adapter(model, _write(tmp_path, "fewer.safetensors", fewer))
  wrong_c = {
    **good,
    "image_proj.norm.weight": torch.ones(24),
    "image_proj.norm.bias": torch.ones(24),
    "image_proj.proj.weight": torch.ones(96, E),
    "image_proj.proj.bias": torch.ones(96),
  }
  with pytest.raises(CheckpointError, match=r"C=24 for a UNet with cross_attention_dim 32"):
    load_ip_adapter(model, _write(tmp_path, "c.safetensors", wrong_c))
  with pytest.raises(CheckpointError, match=r"unexpected key 'image_proj.extra'"):
    load_ip_adapter(
      model, _write(tmp_path, "x.safetensors", {**good, "image_proj.extra": torch.ones(1)})
    )
  with pytest.raises(CheckpointError, match=r"unexpected key 'text_encoder.x'"):
    load_ip_adapter(
      model, _write(tmp_path, "t.safetensors", {**good, "text_encoder.x": torch.ones(1)})
    )
  missing = {k: v for k, v in good.items() if k != "ip_adapter.3.to_v_ip.weight"}
  with pytest.raises(
    CheckpointError,
    match=r"missing key 'ip_adapter.3.to_v_ip.weight' "
    r"\(expected shape \[32, 32\]\)",
  ):
    load_ip_adapter(model, _write(tmp_path, "m.safetensors", missing))
  wrong_e = load_unet(folder, adapter=AdapterConfig(4, E + 1))
  good_path = _write(tmp_path, "good.safetensors", good)
  with pytest.raises(
    CheckpointError,
    match=r"key 'image_proj.proj.weight' has shape \[128, 40\], "
    r"expected \[128, 41\]",
  ):
    load_ip_adapter(wrong_e, good_path)
  path = _write(tmp_path, "trunc.safetensors", good)
  os.truncate(path, os.path.getsize(path) - 64)
  with pytest.raises(CheckpointError, match=r"trunc.safetensors: truncated file: tensor"):
    load_ip_adapter(model, path)
  faceid = {
    "image_proj.proj.0.weight": torch.ones(8, 4),
    "image_proj.norm.weight": torch.ones(8),
    **{k: v for k, v in good.items() if k.startswith("ip_adapter.")},
  }
  with pytest.raises(CheckpointError, match="FaceID"):
    load_ip_adapter(model, _write(tmp_path, "f.safetensors", faceid))
  plus_model = load_unet(
    folder, ip_adapter=_write(tmp_path, "plus.safetensors", _flat(_official(torch_unet, "plus")))
  )
  with pytest.raises(CheckpointError, match=r"a 'basic' adapter, the model was built for 'plus'"):
    load_ip_adapter(plus_model, good_path)


def test_cli_round_trip_and_summary(unet_folders, tmp_path, capsys):
  torch_unet, folder = unet_folders["sd15"]
  source = _write(tmp_path, "in.safetensors", _flat(_official(torch_unet, "plus")))
  assert convert.main(["inspect", source, "--unet", folder]) == 0
  line = capsys.readouterr().out
  assert "plus IP-Adapter, 16 tokens, E=40, C=32, 11 layers" in line and "fits" in line
  assert convert.main(["to-jax", source, "--unet", folder, "--out", str(tmp_path / "ckpt")]) == 0
  out = str(tmp_path / "back.safetensors")
  assert (
    convert.main(
      ["to-official", str(tmp_path / "ckpt"), "--out", out, "--bin", "--dtype", "float32"]
    )
    == 0
  )
  summary = capsys.readouterr().out
  assert summary.count("wrote ") == 3 and "back.bin" in summary and "MB" in summary
  for path in (out, out.replace(".safetensors", ".bin")):
    back = read_ip_adapter(path)
    for key, value in read_ip_adapter(source).items():
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_cli_failures_write_nothing(unet_folders, tmp_path, capsys):
  torch_unet, folder = unet_folders["sd15"]
  source = _write(tmp_path, "in.safetensors", _flat(_official(torch_unet, "basic")))
  other = unet_folders["sdxl"][1]
  assert convert.main(["to-jax", source, "--unet", other, "--out", str(tmp_path / "ckpt")]) == 1
  assert "error:" in capsys.readouterr().err and not os.path.exists(tmp_path / "ckpt")
  assert convert.main(["to-official", str(tmp_path), "--out", str(tmp_path / "o.safetensors")]) == 1
  assert not os.path.exists(tmp_path / "o.safetensors")
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".partial")]


def test_cli_help_explains_every_command(capsys):
  with pytest.raises(SystemExit):
    convert.main(["--help"])
  text = capsys.readouterr().out
  for command in ("inspect", "to-jax", "to-official", "to-diffusers"):
    assert command in text


def test_base_model_export_round_trip(tmp_path):
  _tiny_pipeline(tmp_path, ref.tiny_unet(ref.SD15_LIKE, 2)).save_pretrained(tmp_path / "original")
  assert (
    convert.main(["to-diffusers", str(tmp_path / "original"), "--out", str(tmp_path / "exported")])
    == 0
  )
  pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "original")
  again = StableDiffusionPipeline.from_pretrained(tmp_path / "exported")
  g = torch.Generator().manual_seed(0)
  x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g)
  ids = torch.tensor([[0, 5, 9, 1] + [1] * 12])
  image = torch.rand(1, 3, 16, 16, generator=g)
  with torch.no_grad():
    np.testing.assert_array_equal(
      pipe.unet(x, 7, ctx).sample.numpy(), again.unet(x, 7, ctx).sample.numpy()
    )
    np.testing.assert_array_equal(
      pipe.vae.encode(image).latent_dist.mean.numpy(),
      again.vae.encode(image).latent_dist.mean.numpy(),
    )
    np.testing.assert_array_equal(
      pipe.text_encoder(ids).last_hidden_state.numpy(),
      again.text_encoder(ids).last_hidden_state.numpy(),
    )
  assert again.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids
  assert type(again.scheduler).__name__ == "DDIMScheduler"


# ----- outputs never replace what they did not write -----------------------------------------


def _users_folder(root):
  """A folder as a user keeps it: notes.txt and data/."""
  os.makedirs(root / "data", exist_ok=True)
  (root / "notes.txt").write_text("my notes")
  (root / "data" / "x.csv").write_text("1,2")
  return {"notes.txt": "my notes", "data/x.csv": "1,2"}


def _contents(root):
  return {
    os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f)).read()
    for d, _, names in os.walk(root)
    for f in names
  }


def _refused(capsys, argv, *words):
  """Runs the CLI, which must fail with one line naming `words`, and print no 'wrote'."""
  capsys.readouterr()
  assert convert.main(argv) == 1
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:"), err
  for word in words:
    assert word in err[0], err
  assert "wrote" not in captured.out
  return err[0]


def test_to_jax_out_dot_in_a_users_folder_is_refused(unet_folders, tmp_path, capsys, monkeypatch):
  """The reported fault: `to-jax ... --out .` printed 'wrote .' and deleted notes.txt and data/."""
  torch_unet, folder = unet_folders["sd15"]
  source = _write(tmp_path, "in.safetensors", _flat(_official(torch_unet, "basic")))
  here = tmp_path / "here"
  files = _users_folder(here)
  monkeypatch.chdir(here)
  _refused(
    capsys, ["to-jax", source, "--unet", folder, "--out", "."], "--out", str(here), "notes.txt"
  )
  assert _contents(here) == files


@pytest.mark.parametrize("command", ["to-jax", "to-diffusers"])
def test_an_existing_folder_is_refused_and_kept(
  unet_folders, tiny_world, tmp_path, capsys, command
):
  torch_unet, folder = unet_folders["sd15"]
  out = tmp_path / "out"
  files = _users_folder(out)
  if command == "to-jax":
    source = _write(tmp_path, "in.safetensors", _flat(_official(torch_unet, "basic")))
    argv = ["to-jax", source, "--unet", folder, "--out", str(out)]
  else:
    argv = ["to-diffusers", str(tiny_world / "sd"), "--out", str(out)]
  _refused(capsys, argv, f"--out {out}", "choose another --out")
  assert _contents(out) == files


def test_to_official_refuses_an_existing_file_unless_overwrite(unet_folders, tmp_path, capsys):
  torch_unet, folder = unet_folders["sd15"]
  source = _write(tmp_path, "in.safetensors", _flat(_official(torch_unet, "basic")))
  assert convert.main(["to-jax", source, "--unet", folder, "--out", str(tmp_path / "ckpt")]) == 0
  out = tmp_path / "mine.safetensors"
  out.write_bytes(b"my file")
  argv = ["to-official", str(tmp_path / "ckpt"), "--out", str(out)]
  _refused(capsys, argv, f"--out {out}", "--overwrite")
  assert out.read_bytes() == b"my file"
  (tmp_path / "other.bin").write_bytes(b"my other file")  # the .bin beside counts too
  _refused(
    capsys,
    ["to-official", str(tmp_path / "ckpt"), "--bin", "--out", str(tmp_path / "other.safetensors")],
    "other.bin",
  )
  assert (tmp_path / "other.bin").read_bytes() == b"my other file"
  assert convert.main(argv + ["--overwrite"]) == 0
  assert f"wrote {out}" in capsys.readouterr().out
  assert set(read_ip_adapter(str(out))) == set(read_ip_adapter(source))


def test_a_rerun_replaces_its_own_output_and_only_that(unet_folders, tmp_path, capsys):
  """Catches a rerun refused on its own output, one command replacing another's output, and
  an output folder without the marker that lists what it wrote."""
  torch_unet, folder = unet_folders["sd15"]
  out = str(tmp_path / "ckpt")
  for kind in ("basic", "plus"):
    source = _write(tmp_path, f"{kind}.safetensors", _flat(_official(torch_unet, kind)))
    assert convert.main(["to-jax", source, "--unet", folder, "--out", out]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with open(os.path.join(out, "adapter_config.json")) as f:
      assert json.load(f)["adapter"]["kind"] == kind  # replaced by the second run
  with open(os.path.join(out, ".ipadapter_jax")) as f:
    marker = json.load(f)
  assert marker["command"] == convert.TO_JAX and "adapter_config.json" in marker["files"]
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".partial")]
  _refused(capsys, ["to-diffusers", str(tmp_path), "--out", out], "output of another command")
  with open(os.path.join(out, "notes.txt"), "w") as f:
    f.write("added by the user")
  _refused(capsys, ["to-jax", source, "--unet", folder, "--out", out], "notes.txt")
  assert open(os.path.join(out, "notes.txt")).read() == "added by the user"


def test_to_diffusers_rerun_replaces_its_own_output(tiny_world, tmp_path, capsys):
  """Catches a to-diffusers rerun refused on (or not replacing) its own earlier output."""
  out = tmp_path / "exported"
  for dtype in ("float32", "float16"):
    assert (
      convert.main(["to-diffusers", str(tiny_world / "sd"), "--out", str(out), "--dtype", dtype])
      == 0
    )
  assert f"wrote {out}" in capsys.readouterr().out
  with open(out / "unet" / "config.json") as f:
    assert json.load(f)  # a diffusers folder, written whole
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
  assert {v.dtype for v in weights.values()} == {np.dtype(np.float16)}  # the second run's


@pytest.mark.parametrize("url", ["gs:/bucket/x", "gs:bucket/x", "foo://x"])
@pytest.mark.parametrize("command", ["to-jax", "to-official", "to-diffusers"])
def test_malformed_out_urls_are_refused_before_anything_is_written(
  unet_folders, tmp_path, capsys, monkeypatch, command, url
):
  """Catches `gs:/bucket` (one slash) and unknown schemes written to a local `gs:` or `foo:`
  folder (and reported as written), or failing late with a traceback."""
  torch_unet, folder = unet_folders["sd15"]
  source = _write(tmp_path, "in.safetensors", _flat(_official(torch_unet, "basic")))
  here = tmp_path / "here"
  here.mkdir()
  monkeypatch.chdir(here)
  out = url + (".safetensors" if command == "to-official" else "")
  argv = {
    "to-jax": ["to-jax", source, "--unet", folder, "--out", out],
    "to-official": ["to-official", str(tmp_path), "--out", out],
    "to-diffusers": ["to-diffusers", str(tmp_path), "--out", out],
  }[command]
  _refused(capsys, argv, f"--out {out}", "URL")
  assert os.listdir(here) == [] and not [n for n in os.listdir(tmp_path) if ":" in n]


@pytest.fixture(scope="module")
def ema_run(tiny_world, tiny_dataset, tmp_path_factory):
  """A 2-step adapter run keeping an EMA, checkpointed at steps 1 and 2: its work directory.
  The EMA's first update copies the weights; the second mixes, so at step 2 EMA != weights."""
  from ipadapter_jax.train.loop import train  # pylint: disable=import-outside-toplevel
  from tests.test_train import tiny_config  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path_factory.mktemp("ema_run") / "run")
  train(
    tiny_config(
      tiny_world,
      tiny_dataset,
      num_steps=2,
      checkpoint_every=1,
      batch_size=2,
      **{"optimizer.ema_decay": 0.99},
    ),
    workdir,
  )
  return workdir


def _checkpointed(workdir, step, item):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), item))


def _adapter_of_file(workdir, path):
  """The JAX adapter arrays {dotted path: array} that an official file loads as."""
  from ipadapter_jax.weights.adapter_checkpoint import abstract_unet_for, adapter_arrays  # pylint: disable=import-outside-toplevel

  model = abstract_unet_for(workdir)
  load_ip_adapter(model, read_ip_adapter(path), source=path)
  return {k: np.asarray(v) for k, v in adapter_arrays(model).items()}


def test_to_official_of_a_run_is_the_runs_own_export(ema_run, tmp_path, capsys):
  """Catches to-official exporting a run's raw weights where the run exports its EMA, or in
  another dtype than the run's export."""
  params, state = _checkpointed(ema_run, 2, "params"), _checkpointed(ema_run, 2, "state")
  key = next(iter(params))
  assert np.abs(state[f"ema.unet.{key}"] - params[key]).max() > 1e-6  # the EMA is its own
  out = tmp_path / "exported.safetensors"
  assert convert.main(["to-official", ema_run, "--out", str(out)]) == 0
  assert "(step 2, EMA)" in capsys.readouterr().out
  assert out.read_bytes() == open(os.path.join(ema_run, "ip_adapter.safetensors"), "rb").read()


def test_to_official_step_picks_that_steps_ema(ema_run, tmp_path, capsys):
  """Catches --step ignored (the latest step exported) or reading another step's weights."""
  out = str(tmp_path / "step1.safetensors")
  assert convert.main(["to-official", ema_run, "--step", "1", "--out", out]) == 0
  assert "(step 1, EMA)" in capsys.readouterr().out
  exported = _adapter_of_file(ema_run, out)
  ema = {
    k[len("ema.unet.") :]: v
    for k, v in _checkpointed(ema_run, 1, "state").items()
    if k.startswith("ema.unet.")
  }
  assert set(exported) == set(ema)
  for key, value in exported.items():
    np.testing.assert_array_equal(value, ema[key], err_msg=key)
  last = _adapter_of_file(ema_run, os.path.join(ema_run, "ip_adapter.safetensors"))
  assert max(float(np.abs(last[k] - exported[k]).max()) for k in last) > 1e-6


def test_to_official_unknown_step_lists_the_steps(ema_run, unet_folders, tmp_path, capsys):
  out = tmp_path / "x.safetensors"
  line = _refused(
    capsys,
    ["to-official", ema_run, "--step", "5", "--out", str(out)],
    "no finalized checkpoint at step 5",
  )
  assert line.endswith("its steps are 1, 2"), line
  assert not out.exists()
  # A to-jax folder has no steps to pick from.
  torch_unet, folder = unet_folders["sd15"]
  source = _write(tmp_path, "in.safetensors", _flat(_official(torch_unet, "basic")))
  assert convert.main(["to-jax", source, "--unet", folder, "--out", str(tmp_path / "ckpt")]) == 0
  _refused(
    capsys,
    ["to-official", str(tmp_path / "ckpt"), "--step", "1", "--out", str(out)],
    "has no steps",
  )
  assert not out.exists()
