"""PyTorch-world weights in and out: diffusers folders, transformers CLIP folders and official
IP-Adapter files."""

from ipadapter_jax.weights.controlnet import load_controlnet, save_controlnet
from ipadapter_jax.weights.diffusers import load_unet, load_vae, save_unet, save_vae
from ipadapter_jax.weights.files import CheckpointError, read_model_folder, read_weight_file
from ipadapter_jax.weights.folders import HubId
from ipadapter_jax.weights.ip_adapter import (
  AdapterFileInfo,
  describe,
  ip_adapter_state_dict,
  load_extra_adapter,
  load_ip_adapter,
  read_ip_adapter,
  save_ip_adapter,
)
from ipadapter_jax.weights.stable_diffusion import (
  StableDiffusion,
  load_stable_diffusion,
  save_stable_diffusion,
)
from ipadapter_jax.weights.t2i_adapter import load_t2i_adapter, save_t2i_adapter
from ipadapter_jax.weights.transformers import (
  load_clip_text,
  load_clip_vision,
  save_clip,
  save_clip_model,
)
