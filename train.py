r"""Train an IP-Adapter (or a UNet) on a device mesh; rerunning the same command resumes.

  python train.py --config configs/sd15_ip_adapter.py --workdir runs/sd15 \
      --config.data.source=/data/built --config.batch_size=64
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a file in configs/", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and exports go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save notes out of the progress bar
  from ipadapter_jax.train.loop import train_command
  sys.exit(train_command(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
