"""The toy world's rates and intervals, and the notebooks' rule over seeds, on small made-up numbers
whose answers are worked out by hand."""

import json
import math
import os
import re

import numpy as np
import pytest

from ipadapter_jax import evaluate
from ipadapter_jax.toy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clip(mean, half, n=100):
  """A per-seed CLIP score with a symmetric 95% interval of half-width `half`."""
  return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def over_seeds(means, half):
  return stats.combine([clip(m, half) for m in means])


# ----- One run's measures ------------------------------------------------------------------------


def test_rate_empty_and_not():
  assert stats.rate([]) == {"rate": 0.0, "ci95": [0.0, 1.0], "n": 0}
  assert stats.rate(np.zeros(0, bool)) == {"rate": 0.0, "ci95": [0.0, 1.0], "n": 0}
  hits = [True, False, True, True]
  assert stats.rate(hits) == evaluate.rate(hits)
  assert stats.rate(hits)["rate"] == 0.75 and stats.rate(hits)["n"] == 4
  np.testing.assert_allclose(stats.rate(hits)["ci95"], evaluate.wilson_interval(3, 4))


def test_pct():
  assert stats.pct({"rate": 0.5, "ci95": [0.2, 0.8], "n": 10}) == "50% [20%, 80%]"
  assert stats.pct({"rate": 0.0, "ci95": [0.0, 1.0], "n": 0}) == "0% [0%, 100%]"
  # Wilson of 3 in 4: [0.301, 0.954]
  assert stats.pct(stats.rate([True, True, True, False])) == "75% [30%, 95%]"


def test_mean_ci():
  m = stats.mean_ci([1.0, 2.0, 3.0])  # sample std 1
  assert m["mean"] == 2.0 and m["n"] == 3
  half = evaluate.Z_95 / math.sqrt(3)
  np.testing.assert_allclose(m["ci95"], [2.0 - half, 2.0 + half])
  assert stats.mean_ci([0.4]) == {"mean": 0.4, "ci95": [0.4, 0.4], "n": 1}  # no spread to use


# ----- Training runs -----------------------------------------------------------------------------


def write_run(folder, losses, validation_every=None):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
    for i, loss in enumerate(losses):
      f.write(json.dumps({"step": 4 * (i + 1), "loss": loss}) + "\n")
      if validation_every and (i + 1) % validation_every == 0:
        f.write(json.dumps({"step": 4 * (i + 1), "eval/clip_i": 0.5}) + "\n")
  return str(folder)


def test_losses_skip_validation_lines(tmp_path):
  run = write_run(tmp_path / "run", [1.0, 0.9, 0.8], validation_every=2)
  steps, loss = stats.losses(run)
  np.testing.assert_array_equal(steps, [4, 8, 12])
  np.testing.assert_array_equal(loss, [1.0, 0.9, 0.8])


def test_check_training_passes_a_falling_loss(tmp_path):
  falling = list(np.linspace(1.0, 0.5, 12))
  run = write_run(tmp_path / "run", falling, validation_every=3)
  steps, loss = stats.check_training(run, "falling")
  assert len(steps) == len(loss) == 12
  np.testing.assert_allclose(loss, falling)


def test_check_training_raises_on_a_rising_loss(tmp_path):
  run = write_run(tmp_path / "run", list(np.linspace(0.5, 1.0, 12)))
  with pytest.raises(AssertionError, match="rising: loss did not fall"):
    stats.check_training(run, "rising")
  # flat is not falling either
  run = write_run(tmp_path / "flat", [0.7] * 8)
  with pytest.raises(AssertionError, match="loss did not fall"):
    stats.check_training(run, "flat")


def test_check_training_judges_the_quarters(tmp_path):
  # 12 losses: quarters of 3. Noisy in the middle, lower at the end than at the start: passes.
  run = write_run(tmp_path / "ok", [1.0, 1.0, 1.0, 5.0, 0.1, 5.0, 0.1, 5.0, 0.1, 0.9, 0.9, 0.9])
  stats.check_training(run, "ok")
  # Low in the middle but the last quarter above the first: fails.
  run = write_run(tmp_path / "up", [0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 1.0])
  with pytest.raises(AssertionError, match="up: loss did not fall"):
    stats.check_training(run, "up")


def test_check_training_too_short_to_judge(tmp_path):
  run = write_run(tmp_path / "short", [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])  # 7 < 8
  _, loss = stats.check_training(run, "short")
  assert len(loss) == 7


def test_check_training_raises_on_a_non_finite_loss(tmp_path):
  for bad in (float("nan"), float("inf")):
    run = write_run(tmp_path / str(bad), [1.0, 0.9, bad])  # short runs are checked for this too
    with pytest.raises(AssertionError, match="diverged: non-finite loss"):
      stats.check_training(run, "diverged")


# ----- Over the seeds ----------------------------------------------------------------------------


def test_combine_pools_rate_hits_over_seeds():
  # 30 of 100 and 10 of 50: the interval is Wilson of 40 in 150, not any per-seed interval's mix
  seeds = [evaluate.rate([True] * 30 + [False] * 70), evaluate.rate([True] * 10 + [False] * 40)]
  agg = stats.combine(seeds)
  np.testing.assert_allclose(agg["ci95"], evaluate.wilson_interval(40, 150))
  assert agg["n"] == 150
  assert agg["mean"] == pytest.approx(0.25)  # the seeds' mean, 40 / 150 would be 0.267
  assert agg["values"] == [0.3, 0.2] and agg["range"] == [0.2, 0.3]
  # equal seeds pool to a narrower interval than one seed's
  one = evaluate.rate([True] * 30 + [False] * 70)
  two = stats.combine([one, one])
  assert two["ci95"][1] - two["ci95"][0] < one["ci95"][1] - one["ci95"][0]
  np.testing.assert_allclose(two["ci95"], evaluate.wilson_interval(60, 200))


def test_combine_clip_half_width_rule():
  # half-widths 0.02, 0.04, 0.06 over k = 3 seeds: sqrt((0.0004 + 0.0016 + 0.0036) / 3 / 3)
  agg = stats.combine([clip(0.5, 0.02), clip(0.6, 0.04), clip(0.7, 0.06)])
  half = math.sqrt(0.0056 / 9)
  assert agg["mean"] == pytest.approx(0.6)
  np.testing.assert_allclose(agg["ci95"], [0.6 - half, 0.6 + half])
  assert agg["range"] == [0.5, 0.7] and agg["values"] == [0.5, 0.6, 0.7] and agg["n"] == 300
  # two equal half-widths h: h / sqrt(2)
  np.testing.assert_allclose(
    over_seeds([0.60, 0.62], 0.01)["ci95"], [0.61 - 0.01 / math.sqrt(2), 0.61 + 0.01 / math.sqrt(2)]
  )


def test_combine_without_intervals():
  bare = [{"mean": 0.9, "ci95": None, "n": 10}, {"mean": 0.91, "ci95": None, "n": 10}]
  agg = stats.combine(bare)
  assert agg["ci95"] is None and agg["range"] == [0.9, 0.91] and agg["n"] == 20
  # one seed without an interval is enough
  assert stats.combine([clip(0.5, 0.1), bare[0]])["ci95"] is None


def test_aggregate():
  rows = [
    {"clip_i": clip(0.5, 0.01), "shape": evaluate.rate([True, False]), "other": 1},
    {"clip_i": clip(0.7, 0.01), "shape": evaluate.rate([True, True]), "other": 2},
  ]
  agg = stats.aggregate(rows, ["clip_i", "shape"])
  assert sorted(agg) == ["clip_i", "shape"]
  assert agg["clip_i"] == stats.combine([rows[0]["clip_i"], rows[1]["clip_i"]])
  np.testing.assert_allclose(agg["shape"]["ci95"], evaluate.wilson_interval(3, 4))


def test_apart():
  assert stats.apart([0.0, 1.0], [1.5, 2.0]) and stats.apart([1.5, 2.0], [0.0, 1.0])
  assert not stats.apart([0.0, 1.0], [0.5, 2.0])
  assert not stats.apart([0.0, 1.0], [1.0, 2.0])  # touching is overlapping
  assert not stats.apart([0.0, 3.0], [1.0, 2.0])  # one inside the other


def test_separation_and_its_reasons():
  high, low = over_seeds([0.60, 0.62], 0.01), over_seeds([0.50, 0.52], 0.01)
  assert stats.separation(high, low) == 1 and stats.separation(low, high) == -1
  # seed ranges apart, intervals overlapping
  high, low = over_seeds([0.60, 0.61], 0.3), over_seeds([0.50, 0.51], 0.3)
  assert stats.separation(high, low) == stats.separation(low, high) == 0
  assert stats.overlap_reason([(high, low)]) == "intervals overlap"
  # intervals apart, seed ranges overlapping
  wide, narrow = over_seeds([0.45, 0.75], 0.001), over_seeds([0.40, 0.50], 0.001)
  assert wide["ci95"][0] > narrow["ci95"][1]
  assert stats.separation(wide, narrow) == stats.separation(narrow, wide) == 0
  assert stats.overlap_reason([(wide, narrow)]) == "seed ranges overlap"
  # both overlapping
  a, b = over_seeds([0.50, 0.60], 0.1), over_seeds([0.55, 0.65], 0.1)
  assert stats.separation(a, b) == 0
  assert stats.overlap_reason([(a, b)]) == "intervals and seed ranges overlap"
  # one pair stopped by its intervals, another by its seed ranges
  assert stats.overlap_reason([(high, low), (wide, narrow)]) == "intervals or seed ranges overlap"
  # no intervals: never separates, however far apart
  bare = lambda m: {"mean": m, "ci95": None, "n": 100}
  far, near = stats.combine([bare(0.9), bare(0.91)]), stats.combine([bare(0.1), bare(0.11)])
  assert stats.separation(far, near) == stats.separation(near, far) == 0
  assert stats.overlap_reason([(far, near)]) == "no 95% intervals to compare"
  assert stats.overlap_reason([(high, low), (far, near)]) == "no 95% intervals to compare"


def test_separation_of_rates():
  many = stats.combine([evaluate.rate([True] * 90 + [False] * 10)] * 2)
  few = stats.combine([evaluate.rate([True] * 10 + [False] * 90)] * 2)
  assert stats.separation(many, few) == 1 and stats.separation(few, many) == -1


# ----- Printing ----------------------------------------------------------------------------------


def test_fmt_and_summary():
  assert stats.fmt("clip_i", 0.61234) == "0.612" and stats.fmt("clip_t", 1.5) == "1.500"
  assert stats.fmt("shape_of_image", 0.4) == "40.0%"
  assert (
    stats.summary("clip_i", over_seeds([0.60, 0.62], 0.01)) == "0.610 [0.603, 0.617] (0.600-0.620)"
  )
  rates = stats.combine(
    [{"rate": 0.3, "ci95": [0.2, 0.4], "n": 100}, {"rate": 0.5, "ci95": [0.4, 0.6], "n": 100}]
  )
  lo, hi = evaluate.wilson_interval(80, 200)
  assert stats.summary("colour_of_image", rates) == f"40.0% [{lo:.1%}, {hi:.1%}] (30.0%-50.0%)"
  bare = stats.combine([{"mean": 0.9, "ci95": None, "n": 1}, {"mean": 0.91, "ci95": None, "n": 1}])
  assert stats.summary("clip_i", bare) == "0.905 (0.900-0.910)"


def test_error_bars():
  aggs = [
    {"mean": 0.5, "ci95": [0.4, 0.7]},
    {"mean": 0.5, "ci95": None},
    {"mean": 0.5, "ci95": [0.55, 0.6]},
  ]  # a mean outside its interval: no negative bar
  bars = stats.error_bars(aggs)
  assert bars.shape == (2, 3)
  np.testing.assert_allclose(bars, [[0.1, 0.0, 0.0], [0.2, 0.0, 0.1]])


# ----- The notebooks use these -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["token_ablation", "decoupled_vs_simple"])
def test_notebooks_call_what_exists(name):
  """The notebooks' stats.* names exist, and the helpers are no longer defined there again."""
  with open(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), encoding="utf-8") as f:
    book = json.load(f)
  code = "\n".join("".join(c["source"]) for c in book["cells"] if c["cell_type"] == "code")
  compile(code, name, "exec")
  used = set(re.findall(r"\bstats\.(\w+)", code))
  assert {"check_training", "aggregate", "summary", "separation", "fmt"} <= used
  assert all(callable(getattr(stats, n, None)) for n in used), used
  assert not re.search(r"^def (combine|separation|check_training|summary)\(", code, re.M)
