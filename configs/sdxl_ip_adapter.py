r"""IP-Adapter on SDXL base with the ViT-H image encoder (pooled text embeds and time ids as SDXL
conditions), at 1024x1024.

  python train.py --config configs/sdxl_ip_adapter.py --workdir runs/sdxl \
      --config.data.source=/data/laion_coyo_built --config.mesh.fsdp=4
"""

from ipadapter_jax.configs.sdxl_ip_adapter import get_config  # noqa: F401  (defined in the package)
