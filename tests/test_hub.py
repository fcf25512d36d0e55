"""Hub ids: what each download fetches, pinned revisions, and loads from the downloaded files.

No network: `huggingface_hub.snapshot_download` / `hf_hub_download` are replaced by a fake hub
that serves test-made repositories whose file lists copy the real ones, choosing files with
huggingface_hub's own pattern matching (`filter_repo_objects`).
"""

import json
import os
import shutil

import numpy as np
import pytest
from huggingface_hub.utils import filter_repo_objects

from ipadapter_jax.cli.sample import main as sample_main
from ipadapter_jax.configs import sd15_ip_adapter
from ipadapter_jax.train import loading
from ipadapter_jax.train.checks import TrainingError, check_resume
from ipadapter_jax.weights import (
  CheckpointError,
  HubId,
  load_controlnet,
  load_ip_adapter,
  load_stable_diffusion,
  load_t2i_adapter,
  read_model_folder,
)
from ipadapter_jax.weights.files import read_safetensors, write_safetensors
from ipadapter_jax.weights.folders import local_file
from ipadapter_jax.weights.ip_adapter import ip_adapter_state_dict
from ipadapter_jax.weights.stable_diffusion import pipeline_patterns

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# stable-diffusion-v1-5/stable-diffusion-v1-5 as listed on the hub.
SD15_FILES = """
.gitattributes README.md model_index.json v1-inference.yaml
v1-5-pruned.ckpt v1-5-pruned.safetensors v1-5-pruned-emaonly.ckpt
v1-5-pruned-emaonly.safetensors
feature_extractor/preprocessor_config.json
safety_checker/config.json safety_checker/model.safetensors safety_checker/model.fp16.safetensors
safety_checker/pytorch_model.bin safety_checker/pytorch_model.fp16.bin
safety_checker/flax_model.msgpack
scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.safetensors text_encoder/model.fp16.safetensors
text_encoder/pytorch_model.bin text_encoder/pytorch_model.fp16.bin text_encoder/flax_model.msgpack
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json
tokenizer/vocab.json
unet/config.json unet/diffusion_pytorch_model.safetensors
unet/diffusion_pytorch_model.fp16.safetensors unet/diffusion_pytorch_model.non_ema.safetensors
unet/diffusion_pytorch_model.bin unet/diffusion_pytorch_model.fp16.bin
unet/diffusion_pytorch_model.non_ema.bin unet/diffusion_flax_model.msgpack
vae/config.json vae/diffusion_pytorch_model.safetensors vae/diffusion_pytorch_model.fp16.safetensors
vae/diffusion_pytorch_model.bin vae/diffusion_pytorch_model.fp16.bin
vae/diffusion_flax_model.msgpack
""".split()
TOKENIZER = [
  "tokenizer/merges.txt",
  "tokenizer/special_tokens_map.json",
  "tokenizer/tokenizer_config.json",
  "tokenizer/vocab.json",
]
# h94/IP-Adapter, in part.
IP_ADAPTER_FILES = """
README.md
models/ip-adapter_sd15.safetensors models/ip-adapter_sd15.bin
models/ip-adapter-plus_sd15.safetensors models/ip-adapter-plus_sd15.bin
models/image_encoder/config.json models/image_encoder/model.safetensors
models/image_encoder/pytorch_model.bin
sdxl_models/ip-adapter_sdxl.safetensors sdxl_models/ip-adapter_sdxl.bin
sdxl_models/image_encoder/config.json sdxl_models/image_encoder/model.safetensors
sdxl_models/image_encoder/pytorch_model.bin
""".split()
# stabilityai/stable-diffusion-xl-base-1.0, in part (its ONNX and OpenVINO exports included).
SDXL_FILES = """
model_index.json sd_xl_base_1.0.safetensors sd_xl_base_1.0_0.9vae.safetensors
sd_xl_offset_example-lora_1.0.safetensors
scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.safetensors text_encoder/model.fp16.safetensors
text_encoder/model.onnx text_encoder/openvino_model.bin text_encoder/openvino_model.xml
text_encoder_2/config.json text_encoder_2/model.safetensors
text_encoder_2/model.fp16.safetensors text_encoder_2/model.onnx text_encoder_2/model.onnx_data
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json
tokenizer/vocab.json
tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json tokenizer_2/tokenizer_config.json
tokenizer_2/vocab.json
unet/config.json unet/diffusion_pytorch_model.safetensors
unet/diffusion_pytorch_model.fp16.safetensors unet/model.onnx unet/model.onnx_data
unet/diffusion_flax_model.msgpack
vae/config.json vae/diffusion_pytorch_model.safetensors vae/diffusion_pytorch_model.fp16.safetensors
vae_1_0/config.json vae_1_0/diffusion_pytorch_model.safetensors
vae_decoder/config.json vae_decoder/model.onnx vae_encoder/config.json vae_encoder/model.onnx
""".split()


def _fetched(files, patterns) -> set[str]:
  return set(filter_repo_objects(files, allow_patterns=patterns))


class FakeHub:
  """Repositories as {name in repo: local file to serve, or None for bytes no loader may read};
  every download is recorded."""

  def __init__(self, root, repos: dict[str, dict[str, str | None]]):
    self.root, self.repos, self.calls = root, repos, []

  def _serve(self, repo_id: str, revision, names) -> str:
    snapshot = os.path.join(
      self.root, repo_id.replace("/", "--"), revision or "main", str(len(self.calls))
    )
    for name in names:
      target = os.path.join(snapshot, name)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      source = self.repos[repo_id][name]
      if source is None:
        with open(target, "wb") as f:
          f.write(b"never to be read")
      else:
        shutil.copyfile(source, target)
    os.makedirs(snapshot, exist_ok=True)
    return snapshot

  def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, **unused):
    assert not unused, unused
    files = _fetched(self.repos[repo_id], allow_patterns)
    self.calls.append(
      dict(
        kind="snapshot",
        repo_id=repo_id,
        revision=revision,
        allow_patterns=allow_patterns,
        files=files,
      )
    )
    return self._serve(repo_id, revision, files)

  def hf_hub_download(self, repo_id, filename, *, subfolder=None, revision=None, **unused):
    assert not unused, unused
    name = f"{subfolder}/{filename}" if subfolder else filename
    self.calls.append(
      dict(
        kind="file",
        repo_id=repo_id,
        revision=revision,
        subfolder=subfolder,
        filename=filename,
        files={name},
      )
    )
    if name not in self.repos.get(repo_id, {}):
      raise FileNotFoundError(f"404 Client Error.\n\nEntry Not Found for url: {name}.")
    return os.path.join(self._serve(repo_id, revision, [name]), name)


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_world):
  """A fake hub holding SD1.5 and h94/IP-Adapter made of the tiny world's files: each weight
  variant holds the same tiny weights, every file no loader reads holds junk."""
  sd = tiny_world / "sd"
  words = tiny_world / "words"
  tokenizer = tmp_path / "special_tokens_map.json"
  tokenizer.write_text(
    json.dumps(
      {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
      }
    )
  )
  real = {
    "tokenizer/vocab.json": words / "vocab.json",
    "tokenizer/merges.txt": words / "merges.txt",
    "tokenizer/special_tokens_map.json": tokenizer,
  }
  sd15 = {}
  for name in SD15_FILES + ["tokenizer/tokenizer.json"]:  # what transformers 5 writes, too
    plain = sd / name.replace(".fp16.", ".")
    sd15[name] = str(real.get(name) or (plain if plain.is_file() else "")) or None
  encoder = tiny_world / "adapter" / "image_encoder"
  h94 = dict.fromkeys(IP_ADAPTER_FILES)
  h94.update(
    {
      "models/ip-adapter_sd15.safetensors": str(tiny_world / "adapter" / "ip-adapter.safetensors"),
      "models/image_encoder/config.json": str(encoder / "config.json"),
      "models/image_encoder/model.safetensors": str(encoder / "model.safetensors"),
      # not in the real folder (CLIP's defaults apply there); read when present
      "models/image_encoder/preprocessor_config.json": str(encoder / "preprocessor_config.json"),
    }
  )
  fake = FakeHub(
    str(tmp_path / "hub"),
    {
      SD15: sd15,
      "h94/IP-Adapter": h94,
      "lllyasviel/sd-controlnet-canny": dict.fromkeys(
        [
          "config.json",
          "diffusion_pytorch_model.bin",
          "diffusion_pytorch_model.safetensors",
          "images/bird_canny.png",
          "README.md",
        ]
      ),
      "TencentARC/t2i-adapter-canny-sdxl-1.0": dict.fromkeys(
        [
          "config.json",
          "diffusion_pytorch_model.safetensors",
          "diffusion_pytorch_model.fp16.safetensors",
          "README.md",
        ]
      ),
    },
  )
  monkeypatch.setattr("huggingface_hub.snapshot_download", fake.snapshot_download)
  monkeypatch.setattr("huggingface_hub.hf_hub_download", fake.hf_hub_download)
  return fake


SD15_MODELS = {
  "unet/config.json",
  "unet/diffusion_pytorch_model.safetensors",
  "vae/config.json",
  "vae/diffusion_pytorch_model.safetensors",
  "text_encoder/config.json",
  "text_encoder/model.safetensors",
}
SD15_REST = {
  "model_index.json",
  "scheduler/scheduler_config.json",
  *TOKENIZER,
  "tokenizer/tokenizer.json",
}


def test_sd15_download_is_what_the_loader_reads_at_the_pinned_revision(hub, tiny_world):
  sd = load_stable_diffusion(SD15, revision="0123abcd")
  (call,) = hub.calls
  assert (call["repo_id"], call["revision"]) == (SD15, "0123abcd")
  # No root checkpoint, safety checker, feature extractor, fp16 / non-EMA copy, .bin or Flax.
  assert call["files"] == SD15_MODELS | SD15_REST
  local = load_stable_diffusion(str(tiny_world / "sd"))
  np.testing.assert_array_equal(sd.unet.conv_in.kernel[...], local.unet.conv_in.kernel[...])


def test_a_variant_download_takes_that_variant_only(hub):
  sd = load_stable_diffusion(SD15, variant="fp16")
  fp16 = {
    name.replace(".safetensors", ".fp16.safetensors") if name.endswith(".safetensors") else name
    for name in SD15_MODELS
  }
  assert hub.calls[0]["files"] == fp16 | SD15_REST and hub.calls[0]["revision"] is None
  assert sd.vae is not None and sd.text_encoder is not None


def test_sdxl_download_adds_the_second_text_encoder_and_skips_exports():
  expected = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    *TOKENIZER,
    *(name.replace("tokenizer/", "tokenizer_2/") for name in TOKENIZER),
  }
  for folder, stem in (
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
    ("text_encoder_2", "model"),
  ):
    expected |= {f"{folder}/config.json", f"{folder}/{stem}.fp16.safetensors"}
  assert _fetched(SDXL_FILES, pipeline_patterns("fp16")) == expected


def test_shards_and_their_index_come_with_their_variant_only():
  stem = "unet/diffusion_pytorch_model"
  plain = {
    f"{stem}-00001-of-00002.safetensors",
    f"{stem}-00002-of-00002.safetensors",
    f"{stem}.safetensors.index.json",
  }
  fp16 = {
    f"{stem}.fp16-00001-of-00002.safetensors",
    f"{stem}.fp16-00002-of-00002.safetensors",
    f"{stem}.safetensors.index.fp16.json",
  }
  legacy = {f"{stem}-00001-of-00002.fp16.safetensors", f"{stem}.safetensors.fp16.index.json"}
  bins = {f"{stem}-00001-of-00002.bin", f"{stem}.bin.index.json", f"{stem}.bin.index.fp16.json"}
  files = plain | fp16 | legacy | bins | {"unet/config.json"}
  assert _fetched(files, pipeline_patterns(None)) == plain | {"unet/config.json"}
  assert _fetched(files, pipeline_patterns("fp16")) == fp16 | legacy | {"unet/config.json"}


def test_variant_shards_under_the_older_index_name_are_read(tmp_path):
  a, b = np.arange(3, dtype=np.float32), np.ones((2, 2), np.float32)
  write_safetensors(str(tmp_path / "model-00001-of-00002.fp16.safetensors"), {"a": a})
  write_safetensors(str(tmp_path / "model-00002-of-00002.fp16.safetensors"), {"b": b})
  (tmp_path / "model.safetensors.fp16.index.json").write_text(
    json.dumps(
      {
        "weight_map": {
          "a": "model-00001-of-00002.fp16.safetensors",
          "b": "model-00002-of-00002.fp16.safetensors",
        }
      }
    )
  )
  state, source = read_model_folder(str(tmp_path), "model", "fp16")
  assert source.endswith("model.safetensors.fp16.index.json")
  np.testing.assert_array_equal(state["a"], a)
  np.testing.assert_array_equal(state["b"], b)


def test_adapter_files_and_the_image_encoder_by_hub_id(hub, tiny_world):
  official = read_safetensors(str(tiny_world / "adapter" / "ip-adapter.safetensors"))
  sd = load_stable_diffusion(
    SD15,
    image_encoder=HubId("h94/IP-Adapter", "models/image_encoder", revision="enc1"),
    ip_adapter=[
      "h94/IP-Adapter/models/ip-adapter_sd15.safetensors",
      HubId("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors", "v2"),
    ],
  )
  files = [c for c in hub.calls if c["kind"] == "file"]
  assert [(c["repo_id"], c["subfolder"], c["filename"], c["revision"]) for c in files] == [
    ("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors", None),
    ("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors", "v2"),
  ]
  (encoder,) = [c for c in hub.calls if c["repo_id"] == "h94/IP-Adapter" and c["kind"] != "file"]
  assert encoder["revision"] == "enc1"
  assert encoder["files"] == {
    "models/image_encoder/config.json",
    "models/image_encoder/model.safetensors",
    "models/image_encoder/preprocessor_config.json",
  }
  assert sd.image_encoder is not None and len(sd.extra_adapters) == 1
  for model in (sd.unet, sd.extra_adapters[0]):
    loaded = ip_adapter_state_dict(model)
    np.testing.assert_array_equal(
      loaded["image_proj.proj.weight"], official["image_proj.proj.weight"].astype(np.float32)
    )
  # As diffusers' load_ip_adapter takes it: repository, subfolder and file name apart.
  sd.unet.image_proj.norm.scale.set_value(sd.unet.image_proj.norm.scale[...] * 0)
  load_ip_adapter(
    sd.unet,
    "h94/IP-Adapter",
    subfolder="models",
    weight_name="ip-adapter_sd15.safetensors",
    revision="v3",
  )
  assert hub.calls[-1]["revision"] == "v3" and hub.calls[-1]["subfolder"] == "models"
  np.testing.assert_array_equal(
    ip_adapter_state_dict(sd.unet)["image_proj.norm.weight"],
    official["image_proj.norm.weight"].astype(np.float32),
  )


def test_bad_ids_and_failed_downloads_end_in_one_line(hub):
  with pytest.raises(CheckpointError, match="not a hub file id"):
    local_file("h94/IP-Adapter")
  with pytest.raises(CheckpointError, match="names a file where a folder is needed"):
    load_stable_diffusion(HubId("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors"))
  with pytest.raises(CheckpointError, match="revision 'b' asked as well"):
    local_file(HubId("h94/IP-Adapter", "models", "x.safetensors", "a"), revision="b")
  with pytest.raises(CheckpointError) as error:
    local_file("h94/IP-Adapter/models/missing.safetensors", revision="r")
  message = str(error.value)
  assert "\n" not in message and message.startswith(
    "h94/IP-Adapter/models/missing.safetensors (revision r): not on this disk, and the hub "
    "download failed (FileNotFoundError: 404 Client Error. Entry Not Found"
  )


def test_controlnet_and_t2i_adapter_fetch_one_weight_file_at_their_revision(hub):
  # Their repositories here hold junk: the loads fail after the download, which is what counts.
  with pytest.raises(CheckpointError):
    load_controlnet("lllyasviel/sd-controlnet-canny", revision="c1")
  with pytest.raises(CheckpointError):
    load_t2i_adapter("TencentARC/t2i-adapter-canny-sdxl-1.0", variant="fp16", revision="t1")
  (net, t2i) = hub.calls
  assert (net["revision"], net["files"]) == (
    "c1",
    {"config.json", "diffusion_pytorch_model.safetensors"},
  )
  assert (t2i["revision"], t2i["files"]) == (
    "t1",
    {"config.json", "diffusion_pytorch_model.fp16.safetensors"},
  )


def test_training_reads_model_revision_and_refuses_to_resume_with_another(monkeypatch, tmp_path):
  cfg = sd15_ip_adapter.get_config()
  assert cfg.model.pretrained == SD15 and cfg.model.revision == ""
  seen = {}

  def fake_load(path, **kwargs):
    seen.update(kwargs, path=path)
    raise CheckpointError("stop after the call")

  monkeypatch.setattr(loading, "load_stable_diffusion", fake_load)
  cfg.model.trainable, cfg.model.revision = "unet", "5f3c"
  with pytest.raises(CheckpointError, match="stop after the call"):
    loading.load_models(cfg)
  assert (seen["path"], seen["revision"]) == (SD15, "5f3c")
  (tmp_path / "config.json").write_text(cfg.to_json_best_effort())
  cfg.model.revision = "main"
  with pytest.raises(TrainingError, match="model.revision: '5f3c' -> 'main'"):
    check_resume(cfg, str(tmp_path))


def test_sample_passes_revision_and_variant(monkeypatch, tmp_path, capsys):
  seen = {}

  def fake_load(path, **kwargs):
    seen.update(kwargs, path=path)
    raise CheckpointError("stop after the call")

  monkeypatch.setattr("ipadapter_jax.weights.load_stable_diffusion", fake_load)
  code = sample_main(
    [
      "--pretrained",
      SD15,
      "--revision",
      "abc",
      "--variant",
      "fp16",
      "--out",
      str(tmp_path / "g.png"),
    ]
  )
  assert code == 1 and "stop after the call" in capsys.readouterr().err
  assert (seen["path"], seen["revision"], seen["variant"]) == (SD15, "abc", "fp16")
