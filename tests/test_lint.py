"""The code is formatted and linted as pyproject.toml's [tool.ruff] says (ruff runs in well under a
second on the whole tree)."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args: str) -> subprocess.CompletedProcess:
  ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
  assert ruff, "ruff is not installed (it is in the test extra)"
  return subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_the_code_passes_the_linter():
  result = _ruff("check", "--no-cache", ".")
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted():
  result = _ruff("format", "--check", "--no-cache", ".")
  assert result.returncode == 0, result.stdout + result.stderr
