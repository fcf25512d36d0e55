r"""IP-Adapter on SDXL base with the ViT-H image encoder (pooled text embeds and time ids as SDXL
conditions), at 1024x1024.

  ipadapter-jax train --config sdxl --workdir runs/sdxl \
      --config.data.source=/data/laion_coyo_built --config.mesh.fsdp=4
"""

from ipadapter_jax.configs import sd15_ip_adapter


def get_config():
  c = sd15_ip_adapter.get_config()
  c.model.pretrained = "stabilityai/stable-diffusion-xl-base-1.0"
  c.model.frozen_dtype = "bfloat16"
  c.data.resolution = 1024
  c.batch_size = 64
  return c
