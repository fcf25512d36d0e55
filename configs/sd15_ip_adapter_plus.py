r"""IP-Adapter Plus (Resampler over hidden_states[-2], 16 tokens) on Stable Diffusion 1.5.

  python train.py --config configs/sd15_ip_adapter_plus.py --workdir runs/sd15_plus \
      --config.data.source=/data/laion_coyo_built
"""

from ipadapter_jax.configs.sd15_ip_adapter_plus import get_config  # noqa: F401  (defined in the package)
