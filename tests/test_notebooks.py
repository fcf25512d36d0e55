"""Every notebook runs headless on the CI-sized toy world, and its own assertions hold."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {  # parameters that replace the notebooks' defaults
    "token_ablation": {"TOKENS": [1, 4], "NUM_STEPS": 10},
    "decoupled_vs_simple": {"NUM_STEPS": 10},
    "weights_roundtrip": {"STEPS": 5},
}


def _with_parameters(book, values: dict):
  """The notebook with its parameters cell's assignments extended by `values`."""
  cell = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
  cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
  return book


# One worker runs every test on the quick toy world, which is then built once.
pytestmark = pytest.mark.xdist_group("toy_world")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs(name, quick_toy_world, tmp_path):
  workdir, _ = quick_toy_world
  book = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
  assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), \
      "notebooks are committed without outputs"
  book = _with_parameters(book, {"WORKDIR": workdir, "QUICK": True, **SMALL[name]})
  NotebookClient(book, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
  printed = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code"
                    for o in c.outputs if o.output_type == "stream")
  assert printed, f"{name} printed nothing"
