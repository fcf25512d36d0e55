r"""IP-Adapter Plus (Resampler over hidden_states[-2], 16 tokens) on Stable Diffusion 1.5.

  ipadapter-jax train --config sd15_plus --workdir runs/sd15_plus \
      --config.data.source=/data/laion_coyo_built
"""

from ipadapter_jax.configs import sd15_ip_adapter


def get_config():
  c = sd15_ip_adapter.get_config()
  c.model.adapter.kind = "plus"
  c.model.adapter.num_tokens = 16
  return c
