"""The package as a user gets it: every import declared in setup.cfg, and the wheel installed in a
fresh environment, away from this checkout, running its console command end to end."""

import ast
import configparser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from ipadapter_jax import __version__
from ipadapter_jax.data.image_text import build_image_text_dataset
from ipadapter_jax.toy import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ipadapter_jax")

# Imported only inside the functions that need them, for what an extra provides:
# module -> (extra, distribution).
OPTIONAL = {
  "torch": ("test", "torch"),  # reading official .bin (pickle) files
  "tensorflow": ("tf", "tensorflow"),
}  # TFDS datasets that need TensorFlow to read


def _name(requirement: str) -> str:
  """A requirement's distribution name, normalised (PEP 503)."""
  return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def _requirements() -> tuple[set[str], dict[str, set[str]]]:
  """(install_requires, {extra: its requirements}) of setup.cfg, as normalised names."""
  cfg = configparser.ConfigParser(interpolation=None)
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  names = lambda value: {_name(line) for line in value.splitlines() if line.strip()}
  extras = {extra: names(value) for extra, value in cfg["options.extras_require"].items()}
  return names(cfg["options"]["install_requires"]), extras


def _imports():
  """(top-level module, file, at module level?) of every absolute import in the package."""
  for folder, _, files in os.walk(PACKAGE):
    for file in files:
      if not file.endswith(".py"):
        continue
      path = os.path.join(folder, file)
      with open(path) as f:
        tree = ast.parse(f.read())
      module_level = {id(node) for node in tree.body}
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
          modules = [node.module]
        else:
          continue
        for module in modules:
          yield module.split(".")[0], os.path.relpath(path, ROOT), id(node) in module_level


def test_every_import_is_a_declared_dependency():
  """Catches an import of a package that setup.cfg does not declare (it works here, where the
  test extra and its dependencies are installed, and fails in a user's environment), and an
  optional one imported at module level (every import of the package would then need it)."""
  required, extras = _requirements()
  distributions = importlib.metadata.packages_distributions()
  undeclared = set()
  for top, path, module_level in _imports():
    if top in sys.stdlib_module_names or top in ("ipadapter_jax", "__future__"):
      continue
    if top in OPTIONAL:
      extra, distribution = OPTIONAL[top]
      assert distribution in extras[extra], (top, extra)
      assert not module_level, f"{path} imports {top} (the {extra} extra) at module level"
      continue
    if not {_name(d) for d in distributions.get(top, [])} & required:
      undeclared.add(f"{top} ({path})")
  assert not undeclared, sorted(undeclared)


def _run(argv, cwd, env, timeout=300) -> str:
  result = subprocess.run(
    argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
  )
  assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-3000:])
  return result.stdout


@pytest.mark.slow
def test_the_wheel_installs_and_its_command_trains_samples_and_converts(tmp_path):
  """Build the wheel from this checkout's package files, install it (and nothing else) in a new
  environment that borrows this one's dependencies, and from a folder outside the checkout:
  train the toy adapter two steps from the installed `toy_adapter` config and the installed toy
  weights, sample with it, convert it to the official format. Catches a file the package reads
  but does not ship, a config found only in a checkout, and a console script that is missing."""
  source = tmp_path / "source"  # the build writes build/ and *.egg-info beside its sources
  shutil.copytree(PACKAGE, source / "ipadapter_jax", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(os.path.join(ROOT, name), source)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  _run(
    [
      sys.executable,
      "-m",
      "build",
      "--wheel",
      "--no-isolation",
      "--outdir",
      str(tmp_path / "dist"),
      str(source),
    ],
    tmp_path,
    env,
  )
  [wheel] = (tmp_path / "dist").glob("ipadapter_jax-*.whl")

  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
  version = f"python{sys.version_info.major}.{sys.version_info.minor}"
  site_packages = venv / "lib" / version / "site-packages"
  # This environment's packages, after the new one's own: only ipadapter_jax is installed anew.
  # (A path line in a .pth file adds no .pth files of its own: the editable checkout stays out.)
  (site_packages / "borrowed.pth").write_text(
    "\n".join(p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)) + "\n"
  )
  _run(
    [
      sys.executable,
      "-m",
      "pip",
      "--python",
      str(venv / "bin" / "python"),
      "install",
      "-q",
      "--no-deps",
      "--no-index",
      "--no-cache-dir",
      str(wheel),
    ],
    tmp_path,
    env,
  )

  work = tmp_path / "work"
  work.mkdir()
  # Compile-time LLVM optimisation off: a third of the train step's compile time, and nothing
  # here measures speed.
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
  command = str(venv / "bin" / "ipadapter-jax")
  installed = str(site_packages / "ipadapter_jax")
  assert _run([command, "--version"], work, env).strip() == (
    f"ipadapter-jax {__version__} ({installed})"
  )

  annotations = shapes.write_dataset(str(work / "shapes"), 8, seed=0)
  build_image_text_dataset(annotations, str(work / "shapes"), str(work / "data"))

  out = _run(
    [
      command,
      "train",
      "--config",
      "toy_adapter",
      "--workdir",
      "run",
      "--config.data.source=data",
      "--config.num_steps=2",
      "--config.batch_size=4",
      "--config.eval_every=0",
      "--config.checkpoint_every=2",
      "--config.optimizer.warmup_steps=0",
    ],
    work,
    env,
  )
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["step"] == 2 and not summary["stopped_by_signal"], summary
  config = json.loads((work / "run" / "config.json").read_text())
  weights = os.path.join(installed, "toy", "weights")
  assert config["model"]["pretrained"] == os.path.join(weights, "base"), config["model"]

  _run(
    [
      command,
      "sample",
      "--pretrained",
      os.path.join(weights, "base"),
      "--image_encoder",
      os.path.join(weights, "clip"),
      "--ip_adapter",
      "run/ip_adapter.safetensors",
      "--image",
      "shapes/images/000001.png",
      "--num_inference_steps",
      "1",
      "--num_samples",
      "1",
      "--out",
      "grid.png",
    ],
    work,
    env,
  )
  assert Image.open(work / "grid.png").size == (32, 32)

  _run(
    [
      command,
      "convert",
      "to-official",
      "run",
      "--out",
      "adapter.safetensors",
      "--dtype",
      "float32",
    ],
    work,
    env,
  )
  exported, converted = (
    load_file(str(work / name)) for name in ("run/ip_adapter.safetensors", "adapter.safetensors")
  )
  assert sorted(exported) == sorted(converted)
  for key, value in exported.items():
    np.testing.assert_array_equal(converted[key], value, err_msg=key)
