"""Every notebook runs headless on the toy world; its checks hold, its words match its numbers."""

import json
import os
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Parameters that replace the notebooks' defaults. 48 adapter steps logged every 4 give the
# notebooks' loss check 12 values to compare (it judges from 8 on); over the toy warm-up the
# loss falls by about 15% in that time.
SMALL = {
    "token_ablation": {"TOKENS": [1, 4], "NUM_STEPS": 48, "LOG_EVERY": 4},
    "decoupled_vs_simple": {"NUM_STEPS": 48, "LOG_EVERY": 4},
    "weights_roundtrip": {"STEPS": 5},
}


def _with_parameters(book, values: dict):
  """The notebook with its parameters cell's assignments extended by `values`."""
  cell = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
  cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
  return book


def _losses(stage_dir: str) -> np.ndarray:
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    return np.array([json.loads(line)["loss"] for line in f])


def _assert_the_loss_check_compared(stage_dir: str):
  """The notebook's check judges a run from 8 logged losses on; this run had enough."""
  loss = _losses(stage_dir)
  assert len(loss) >= 8, f"{stage_dir}: {len(loss)} logged losses, too few to judge"


def _pct(x: float) -> str:
  return f"{x:.0%}"


def _check_decoupled_vs_simple(workdir: str, printed: str):
  for stage in ("tokens_4", "simple_4"):
    _assert_the_loss_check_compared(os.path.join(workdir, "ablation", stage))
  with open(os.path.join(workdir, "ablation", "decoupled_vs_simple.json")) as f:
    results = json.load(f)
  lines = printed.splitlines()
  table = [line for line in lines if line.startswith(("| decoupled |", "| simple |"))]
  assert table == [f"| {name} | {setting} | {r['clip_i']:.3f} | {r['clip_t']:.3f} | "
                   f"{_pct(r['colour_asked'])} | {_pct(r['colour_of_image'])} | "
                   f"{_pct(r['shape_of_image'])} |"
                   for name in ("decoupled", "simple") for setting, r in results[name].items()]
  verdicts = [line for line in lines if " ahead by " in line]
  expected = []
  for setting in ("image only", "image + text"):
    for key, label in (("clip_i", "CLIP-I"), ("colour_asked", "colour match"),
                       ("shape_of_image", "shape match")):
      d, s = results["decoupled"][setting][key], results["simple"][setting][key]
      winner = "decoupled" if d > s else "simple" if s > d else "neither"
      expected.append(f"{setting}, {label}: decoupled {d:.3f} vs simple {s:.3f} -> {winner} "
                      f"ahead by {abs(d - s):.3f}")
  assert verdicts == expected
  assert os.path.isfile(os.path.join(workdir, "ablation", "decoupled_vs_simple.png"))


def _check_token_ablation(workdir: str, printed: str):
  tokens = SMALL["token_ablation"]["TOKENS"]
  for n in tokens:
    _assert_the_loss_check_compared(os.path.join(workdir, "ablation", f"tokens_{n}"))
  with open(os.path.join(workdir, "ablation", "tokens.json")) as f:
    rows = {int(n): r["image only"] for n, r in json.load(f).items()}
  assert sorted(rows) == tokens
  final = {n: _losses(os.path.join(workdir, "ablation", f"tokens_{n}"))[-4:].mean() for n in tokens}
  metrics = [("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("colour_of_image", "colour = image"),
             ("shape_of_image", "shape = image")]
  lines = printed.splitlines()
  table = [line for line in lines if re.match(r"\| \d+ \|", line)]
  assert table == [f"| {n} | " + " | ".join(
      f"{rows[n][k]:.3f}" if k.startswith("clip") else _pct(rows[n][k]) for k, _ in metrics)
      + f" | {final[n]:.4f} |" for n in tokens]
  expected = []
  for key, label in metrics:
    values = [rows[n][key] for n in tokens]
    best = tokens[values.index(max(values))]  # the first of equal maxima
    expected.append(f"{label}: best at N={best} ({max(values):.3f}); range {min(values):.3f}-"
                    f"{max(values):.3f} over N.")
  expected.append(f"Final training loss ranges {min(final.values()):.4f}-"
                  f"{max(final.values()):.4f}; lowest at N={min(final, key=final.get)}.")
  spread = max(r["clip_i"] for r in rows.values()) - min(r["clip_i"] for r in rows.values())
  expected.append("CLIP-I barely moves with N here" if spread < 0.02 else
                  f"CLIP-I changes by {spread:.3f} across N: the number of tokens matters here.")
  assert expected[0] in lines, printed
  conclusions = lines[lines.index(expected[0]):]
  assert conclusions[:-1] == expected[:-1] and conclusions[-1].startswith(expected[-1])
  assert os.path.isfile(os.path.join(workdir, "ablation", "tokens.png"))


def _check_weights_roundtrip(workdir: str, printed: str):
  found = re.search(r"max abs difference ([0-9.e+-]+), mean ([0-9.e+-]+) \(images in \[0, 1\]\)",
                    printed)
  assert found, printed
  largest, mean = float(found.group(1)), float(found.group(2))
  print(f"weights_roundtrip: ours against diffusers, max abs difference {largest:.1e}")
  # float32 on both sides: measured 1.3e-6 over 5 DDIM steps (the notebook itself allows 1e-4)
  assert 0 <= mean <= largest <= 1e-5, (largest, mean)
  assert os.path.isfile(os.path.join(workdir, "roundtrip", "side_by_side.png"))


CHECKS = {"decoupled_vs_simple": _check_decoupled_vs_simple,
          "token_ablation": _check_token_ablation,
          "weights_roundtrip": _check_weights_roundtrip}

# One worker runs every test on the quick toy world, which is then built once.
pytestmark = pytest.mark.xdist_group("toy_world")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs(name, quick_toy_world):
  workdir, _ = quick_toy_world
  book = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
  assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), \
      "notebooks are committed without outputs"
  book = _with_parameters(book, {"WORKDIR": workdir, "QUICK": True, **SMALL[name]})
  NotebookClient(book, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
  printed = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code"
                    for o in c.outputs if o.output_type == "stream" and o.name == "stdout")
  CHECKS[name](workdir, printed)
