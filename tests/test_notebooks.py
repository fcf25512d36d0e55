"""Every notebook runs headless on the toy world; its checks hold, its words match its numbers;
and the outputs committed with a notebook come from its committed code, run top to bottom."""

import importlib.util
import json
import os
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from ipadapter_jax import evaluate, toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
# Parameters that replace the notebooks' defaults. 48 adapter steps logged every 4 give the
# notebooks' loss check 12 values to compare (it judges from 8 on); over the toy warm-up the
# loss falls by about 15% in that time. Two seeds per setting keep it short and still aggregate.
SMALL = {
  "token_ablation": {"TOKENS": [1, 4], "SEEDS": [0, 1], "NUM_STEPS": 48, "LOG_EVERY": 4},
  "decoupled_vs_simple": {"SEEDS": [0, 1], "NUM_STEPS": 48, "LOG_EVERY": 4},
  "weights_roundtrip": {"STEPS": 5},
}


def _with_parameters(book, values: dict):
  """The notebook with its parameters cell's assignments extended by `values`."""
  cell = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
  cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
  return book


def _losses(stage_dir: str) -> np.ndarray:
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return np.array([r["loss"] for r in rows if "loss" in r])  # not the validation lines


def _assert_the_loss_check_compared(stage_dir: str):
  """The notebook's check judges a run from 8 logged losses on; this run had enough."""
  loss = _losses(stage_dir)
  assert len(loss) >= 8, f"{stage_dir}: {len(loss)} logged losses, too few to judge"


def _assert_seeded_runs(stage_dirs: dict, overrides: dict):
  """Every seed's run exists, was trained with its seed (and `overrides`), and the seeds gave
  different runs."""
  curves = {}
  for seed, stage_dir in stage_dirs.items():
    _assert_the_loss_check_compared(stage_dir)
    with open(os.path.join(stage_dir, "stage.json")) as f:
      recorded = json.load(f)["overrides"]
    assert recorded["seed"] == seed, (stage_dir, recorded)
    assert all(recorded.get(k) == v for k, v in overrides.items()), (stage_dir, recorded)
    curves[seed] = tuple(_losses(stage_dir))
  assert len(set(curves.values())) == len(curves), f"seeds gave identical runs: {stage_dirs}"


# The notebooks' summary of a setting over its seeds, recomputed here from their per-seed rows.
LABELS = {
  "clip_i": "CLIP-I",
  "clip_t": "CLIP-T",
  "colour_asked": "colour = asked",
  "colour_of_image": "colour = image",
  "shape_of_image": "shape = image",
}
SEPARATES = "What separates (both the 95% intervals and the seed ranges apart):"


def _over_seeds(measures: list) -> dict:
  """mean of the per-seed values, their [min, max], and the 95% interval: for rates Wilson on
  the hits pooled over the seeds; for CLIP scores mean +- sqrt(mean(half-width^2) / seeds)."""
  if "rate" in measures[0]:
    values = [m["rate"] for m in measures]
    hits = sum(round(m["rate"] * m["n"]) for m in measures)
    ci95 = list(evaluate.wilson_interval(hits, sum(m["n"] for m in measures)))
  else:
    values = [m["mean"] for m in measures]
    mean = float(np.mean(values))
    halves = np.array([(m["ci95"][1] - m["ci95"][0]) / 2 for m in measures])
    half = float(np.sqrt(np.mean(halves**2) / len(measures)))
    ci95 = [mean - half, mean + half]
  return {"mean": float(np.mean(values)), "ci95": ci95, "range": [min(values), max(values)]}


def _assert_same_aggregate(saved: dict, expected: dict, where: str):
  for key in ("mean", "ci95", "range"):
    np.testing.assert_allclose(
      saved[key], expected[key], rtol=1e-9, atol=1e-12, err_msg=f"{where}: {key}"
    )


def _fmt(key: str, x: float) -> str:
  return f"{x:.3f}" if key.startswith("clip") else f"{x:.1%}"


def _cell(key: str, a: dict) -> str:
  f = lambda x: _fmt(key, x)
  (low, high), (least, most) = a["ci95"], a["range"]
  return f"{f(a['mean'])} [{f(low)}, {f(high)}] ({f(least)}-{f(most)})"


def _higher(a: dict, b: dict):
  """'a' or 'b' where that one's interval and seed range both lie above the other's, else None."""
  for name, (x, y) in (("a", (a, b)), ("b", (b, a))):
    if x["ci95"][0] > y["ci95"][1] and x["range"][0] > y["range"][1]:
      return name
  return None


def _why_not(pairs: list) -> str:
  overlap = lambda p, q: p[0] <= q[1] and q[0] <= p[1]
  intervals = all(overlap(a["ci95"], b["ci95"]) for a, b in pairs)
  ranges = all(overlap(a["range"], b["range"]) for a, b in pairs)
  return (
    "intervals and seed ranges overlap"
    if intervals and ranges
    else "intervals overlap"
    if intervals
    else "seed ranges overlap"
    if ranges
    else "intervals or seed ranges overlap"
  )


def _conclusions(printed: str) -> list[str]:
  """The lines after the notebook's conclusions header (its last output)."""
  lines = printed.splitlines()
  assert lines.count(SEPARATES) == 1, printed
  return lines[lines.index(SEPARATES) + 1 :]


def _per_seed_rows(by_seed: dict, seeds: list, where: str) -> list:
  assert sorted(by_seed) == sorted(str(s) for s in seeds), f"{where}: seeds {sorted(by_seed)}"
  rows = [by_seed[str(s)] for s in seeds]
  for row in rows:
    assert row["clip_i"]["n"] == toy.QUICK.eval_images, (where, row)
  return rows


def _check_decoupled_vs_simple(workdir: str, printed: str):
  seeds = SMALL["decoupled_vs_simple"]["SEEDS"]
  ablation = os.path.join(workdir, "ablation")
  for attention in ("decoupled", "simple"):
    _assert_seeded_runs(
      {s: os.path.join(ablation, f"{attention}_4_seed{s}") for s in seeds},
      {"model.adapter.num_tokens": 4},
    )
  with open(os.path.join(ablation, "decoupled_vs_simple.json")) as f:
    results = json.load(f)
  assert results["seeds"] == seeds
  settings = ("image only", "image + text")
  keys = ["clip_i", "clip_t", "colour_asked", "colour_of_image", "shape_of_image"]
  agg = {}
  for attention in ("decoupled", "simple"):
    assert list(results["per_seed"][attention]) == list(settings)
    for setting in settings:
      where = f"{attention}, {setting}"
      rows = _per_seed_rows(results["per_seed"][attention][setting], seeds, where)
      agg[attention, setting] = {k: _over_seeds([r[k] for r in rows]) for k in keys}
      for k in keys:
        _assert_same_aggregate(
          results["aggregate"][attention][setting][k], agg[attention, setting][k], f"{where}, {k}"
        )
  lines = printed.splitlines()
  table = [line for line in lines if line.startswith(("| decoupled |", "| simple |"))]
  assert table == [
    f"| {attention} | {setting} | "
    + " | ".join(_cell(k, agg[attention, setting][k]) for k in keys)
    + " |"
    for attention in ("decoupled", "simple")
    for setting in settings
  ]
  expected = []
  for setting in settings:
    for key in keys:
      if setting == "image only" and key == "colour_asked":
        continue  # the colour asked is the image's
      d, s = agg["decoupled", setting][key], agg["simple", setting][key]
      higher = _higher(d, s)
      label = f"{setting}, {LABELS[key]}"
      if higher is None:
        expected.append(f"{label}: decoupled and simple do not separate ({_why_not([(d, s)])}).")
      else:
        (hi, above), (lo, below) = (
          (("decoupled", d), ("simple", s)) if higher == "a" else (("simple", s), ("decoupled", d))
        )
        expected.append(
          f"{label}: {hi} above {lo} ({_fmt(key, above['mean'])} vs {_fmt(key, below['mean'])})."
        )
  assert _conclusions(printed) == expected, printed
  assert os.path.isfile(os.path.join(ablation, "decoupled_vs_simple.png"))


def _check_token_ablation(workdir: str, printed: str):
  tokens, seeds = SMALL["token_ablation"]["TOKENS"], SMALL["token_ablation"]["SEEDS"]
  ablation = os.path.join(workdir, "ablation")
  final = {}
  for n in tokens:
    stages = {s: os.path.join(ablation, f"tokens_{n}_seed{s}") for s in seeds}
    _assert_seeded_runs(stages, {"model.adapter.num_tokens": n})
    per_run = [float(_losses(stages[s])[-4:].mean()) for s in seeds]
    final[n] = (float(np.mean(per_run)), min(per_run), max(per_run))
  with open(os.path.join(ablation, "tokens.json")) as f:
    results = json.load(f)
  assert results["tokens"] == tokens and results["seeds"] == seeds
  assert sorted(results["per_seed"]) == sorted(str(n) for n in tokens)
  keys = ["clip_i", "clip_t", "colour_of_image", "shape_of_image"]
  agg = {}
  for n in tokens:
    rows = _per_seed_rows(results["per_seed"][str(n)], seeds, f"N={n}")
    agg[n] = {k: _over_seeds([r[k] for r in rows]) for k in keys}
    for k in keys:
      _assert_same_aggregate(results["aggregate"][str(n)][k], agg[n][k], f"N={n}, {k}")
  lines = printed.splitlines()
  table = [line for line in lines if re.match(r"\| \d+ \|", line)]
  assert table == [
    f"| {n} | "
    + " | ".join(_cell(k, agg[n][k]) for k in keys)
    + f" | {final[n][0]:.4f} ({final[n][1]:.4f}-{final[n][2]:.4f}) |"
    for n in tokens
  ]
  pairs = [(a, b) for i, a in enumerate(tokens) for b in tokens[i + 1 :]]
  expected = []
  for key in keys:
    found = []
    for a, b in pairs:
      higher = _higher(agg[a][key], agg[b][key])
      if higher is not None:
        hi, lo = (a, b) if higher == "a" else (b, a)
        found.append(
          f"N={hi} above N={lo} ({_fmt(key, agg[hi][key]['mean'])} vs "
          f"{_fmt(key, agg[lo][key]['mean'])})"
        )
    if found:
      expected.append(
        f"{LABELS[key]}: " + "; ".join(found) + f" ({len(found)} of {len(pairs)} pairs)."
      )
    else:
      reason = _why_not([(agg[a][key], agg[b][key]) for a, b in pairs])
      expected.append(f"{LABELS[key]}: no two N separate ({reason}).")
  assert _conclusions(printed) == expected, printed
  assert os.path.isfile(os.path.join(ablation, "tokens.png"))


def _check_weights_roundtrip(workdir: str, printed: str):
  found = re.search(
    r"max abs difference ([0-9.e+-]+), mean ([0-9.e+-]+) \(images in \[0, 1\]\)", printed
  )
  assert found, printed
  largest, mean = float(found.group(1)), float(found.group(2))
  print(f"weights_roundtrip: ours against diffusers, max abs difference {largest:.1e}")
  # float32 on both sides: measured 1.3e-6 over 5 DDIM steps (the notebook itself allows 1e-4)
  assert 0 <= mean <= largest <= 1e-5, (largest, mean)
  assert os.path.isfile(os.path.join(workdir, "roundtrip", "side_by_side.png"))


CHECKS = {
  "decoupled_vs_simple": _check_decoupled_vs_simple,
  "token_ablation": _check_token_ablation,
  "weights_roundtrip": _check_weights_roundtrip,
}


# One worker runs these on the quick toy world, which is then built once.
@pytest.mark.xdist_group("toy_world")
@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs(name, quick_toy_world):
  workdir, _ = quick_toy_world
  book = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  for cell in book.cells:  # a fresh run: none of the committed outputs may reach the checks
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  book = _with_parameters(book, {"WORKDIR": workdir, "QUICK": True, **SMALL[name]})
  NotebookClient(
    book, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
  ).execute()
  printed = "".join(
    o.get("text", "")
    for c in book.cells
    if c.cell_type == "code"
    for o in c.outputs
    if o.output_type == "stream" and o.name == "stdout"
  )
  CHECKS[name](workdir, printed)


# ----- The committed outputs ----------------------------------------------------------------------


def _load_execute():
  """notebooks/execute.py as a module (notebooks/ is no package): its hash is the one to match."""
  spec = importlib.util.spec_from_file_location(
    "notebooks_execute", os.path.join(NOTEBOOKS, "execute.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


execute = _load_execute()
ALL = sorted(f[: -len(".ipynb")] for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))
# Where the docs cite a notebook's printed tables: the section whose heading names the notebook.
CITED_IN = os.path.join(ROOT, "docs", "ablations.md")
# Committed outputs stay readable: a figure or two and short logs, not pages of progress bars.
MAX_BYTES = 1_000_000


def _code_cells(book) -> list:
  return [c for c in book.cells if c.cell_type == "code"]


def _cited_table_lines(name: str) -> list[str]:
  """The table lines of the docs section about notebooks/`name`.ipynb ([] where none is)."""
  with open(CITED_IN, encoding="utf-8") as f:
    sections = re.split(r"^## ", f.read(), flags=re.M)
  ours = [s for s in sections if f"notebooks/{name}.ipynb" in s.split("\n", 1)[0]]
  return [line for s in ours for line in s.splitlines() if line.startswith("|")]


def test_every_notebook_runs_small():
  assert set(SMALL) == set(ALL), "every notebook runs small in test_notebook_runs"


@pytest.mark.parametrize("name", ALL)
def test_committed_outputs_come_from_the_code(name):
  """Every notebook is committed with its outputs (executed by notebooks/execute.py at its
  defaults), so a reader sees them. They were made by the code cells as committed, in one
  top-to-bottom run without an error; the figures are in them, and the docs' tables are what the
  notebook printed."""
  path = os.path.join(NOTEBOOKS, f"{name}.ipynb")
  book = nbformat.read(path, as_version=4)
  record = book.metadata.get(execute.METADATA_KEY)
  assert record, f"{name}: no execution record: run python notebooks/execute.py {path}"
  assert record["source_sha256"] == execute.source_sha256(book), (
    f"{name}: code changed since its outputs were made: run python notebooks/execute.py {path}"
  )
  assert {"version", "executed", "machine", "seconds"} <= set(record), record
  cells = _code_cells(book)
  assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), (
    f"{name}: not one top-to-bottom run: {[c.execution_count for c in cells]}"
  )
  outputs = [o for c in cells for o in c.outputs]
  errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
  assert not errors, errors
  assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no figure shown"
  streams = [o.text for o in outputs if o.output_type == "stream"]
  assert not any("\r" in text for text in streams), f"{name}: raw progress bars in the outputs"
  assert os.path.getsize(path) < MAX_BYTES, f"{name}: {os.path.getsize(path)} bytes"
  printed = set(
    "".join(
      o.text for o in outputs if o.output_type == "stream" and o.name == "stdout"
    ).splitlines()
  )
  missing = [line for line in _cited_table_lines(name) if line not in printed]
  assert not missing, f"docs/ablations.md cites lines {name} did not print: {missing}"


def test_source_hash_follows_the_code_only():
  book = nbformat.v4.new_notebook(
    cells=[
      nbformat.v4.new_markdown_cell("# words"),
      nbformat.v4.new_code_cell("x = 1"),
      nbformat.v4.new_code_cell("print(x)"),
    ]
  )
  digest = execute.source_sha256(book)
  book.cells[0].source = "# other words"
  book.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
  assert execute.source_sha256(book) == digest  # prose and outputs are not code
  book.cells[2].source = "print(x + 1)"
  assert execute.source_sha256(book) != digest
  moved = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1\nprint(x)")])
  assert execute.source_sha256(moved) != execute.source_sha256(
    nbformat.v4.new_notebook(
      cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("print(x)")]
    )
  )  # cell bounds count


def test_progress_bars_kept_as_displayed():
  assert execute.as_displayed("a 0%\ra 50%\ra 100%\nnext\n") == "a 100%\nnext\n"
  assert execute.as_displayed("bar 10%\rbar 20%\r\n") == "bar 20%\n"
  assert execute.as_displayed("plain\nlines\n") == "plain\nlines\n"


def _tiny_notebook(path: str, *sources: str) -> str:
  book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
  book.metadata["kernelspec"] = {
    "name": "python3",
    "display_name": "Python 3",
    "language": "python",
  }
  nbformat.write(book, path)
  return path


def test_execute_writes_outputs_and_record(tmp_path, monkeypatch):
  """A figure comes out as PNG (even with Agg asked for), progress bars as their last state, and
  the record's hash is the code's; the file then passes the committed-outputs checks' core."""
  monkeypatch.setenv("MPLBACKEND", "Agg")
  path = _tiny_notebook(
    str(tmp_path / "ok.ipynb"),
    "import os, sys\nprint(os.getcwd())\n"
    "for i in range(3):\n    print(f'\\rstep {i}', end='', file=sys.stderr, flush=True)",
    "import matplotlib.pyplot as plt\nplt.plot([0, 1])",
  )
  assert execute.main([path, "--timeout", "60"]) == 0
  book = nbformat.read(path, as_version=4)
  cells = _code_cells(book)
  assert book.metadata[execute.METADATA_KEY]["source_sha256"] == execute.source_sha256(book)
  assert [c.execution_count for c in cells] == [1, 2]
  streams = {o.name: o.text for o in cells[0].outputs if o.output_type == "stream"}
  assert streams == {"stdout": ROOT + "\n", "stderr": "step 2"}  # run from the repository root
  assert any("image/png" in o.get("data", {}) for o in cells[1].outputs)


def test_execute_leaves_a_failing_notebook_as_it_was(tmp_path, capsys):
  path = _tiny_notebook(str(tmp_path / "bad.ipynb"), "x = 1", "1 / 0", "x = 2")
  with open(path, "rb") as f:
    before = f.read()
  assert execute.main([path]) == 1
  with open(path, "rb") as f:
    assert f.read() == before
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert (
    err == f"error: {path}: code cell 2: ZeroDivisionError: division by zero; the file is "
    "left as it was"
  ), err
