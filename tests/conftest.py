import pytest
import torch

from tests import torch_reference as ref

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def unet_folders(tmp_path_factory):
  """{family: (diffusers UNet with random weights, its saved folder)} built once per session."""
  out = {}
  for seed, (name, config) in enumerate(
      [("sd15", ref.SD15_LIKE), ("sd2", ref.SD2_LIKE), ("sdxl", ref.SDXL_LIKE)]):
    model = ref.tiny_unet(config, seed=seed)
    folder = tmp_path_factory.mktemp(f"unet_{name}")
    model.save_pretrained(folder)
    out[name] = (model, str(folder))
  return out
