r"""`ipadapter-jax tpu-compile` with this repository's rows: each run appends one to
benchmarks/tpu_compile.json, and `--table` prints them (the latest of each setting) as markdown.

  pip install -e ".[tpu]"
  python benchmarks/tpu_compile.py --model sd15 --topology v5e-8 --program train --batch 8 --fit
  python benchmarks/tpu_compile.py --table
"""

import os
import sys

from ipadapter_jax.cli.tpu_compile import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_compile.json")

if __name__ == "__main__":
  sys.exit(main(["--results", RESULTS, *sys.argv[1:]]))
