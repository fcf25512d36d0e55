"""PyTorch-world weights in and out: diffusers folders and official IP-Adapter files."""

from ipadapter_jax.weights.diffusers import load_unet, unet_torch_name
from ipadapter_jax.weights.files import CheckpointError, read_model_folder, read_weight_file
from ipadapter_jax.weights.ip_adapter import (adapter_config_of, ip_adapter_state_dict,
                                              load_ip_adapter, read_ip_adapter)
