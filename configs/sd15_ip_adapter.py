r"""IP-Adapter on Stable Diffusion 1.5: the paper's recipe (docs/reference.md §5).

  python train.py --config configs/sd15_ip_adapter.py --workdir runs/sd15 \
      --config.data.source=/data/laion_coyo_built --config.batch_size=64

Every key the trainer reads is declared here; variant configs import this one and override.
"""

from ipadapter_jax.configs.sd15_ip_adapter import get_config  # noqa: F401  (defined in the package)
