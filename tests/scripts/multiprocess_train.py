"""One process of a multi-process CPU training run (or the single-process reference).

  python multiprocess_train.py CONFIG_JSON WORKDIR NUM_PROCESSES PROCESS_ID PORT DEVICES_PER_PROCESS
Run by tests/test_train.py: two processes over localhost must train like one with all devices.
STEP_DELAY=SECONDS slows each batch down, so that a test can signal the run mid-way.
"""

import json
import os
import sys
import time

config_json, workdir, num_processes, process_id, port, local_devices = sys.argv[1:]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"

import jax  # noqa: E402
import ml_collections  # noqa: E402

from ipadapter_jax.cli.common import run_command  # noqa: E402
from ipadapter_jax.cli.train import train_command  # noqa: E402
from ipadapter_jax.data import batches  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
cfg = ml_collections.ConfigDict(json.loads(open(config_json).read()))
if int(num_processes) > 1:
  cfg.mesh.coordinator_address = f"localhost:{port}"
  cfg.mesh.num_processes = int(num_processes)
  cfg.mesh.process_id = int(process_id)

delay = float(os.environ.get("STEP_DELAY", "0"))
if delay:
  make_iterator = batches.make_train_iterator

  def slow_iterator(*args, **kwargs):
    iterator = make_iterator(*args, **kwargs)
    fast_next = type(iterator).__next__

    class Slow(type(iterator)):
      def __next__(self):
        time.sleep(delay)
        return fast_next(self)

    iterator.__class__ = Slow
    return iterator

  batches.make_train_iterator = slow_iterator

sys.exit(run_command(lambda: train_command(cfg, workdir)))
