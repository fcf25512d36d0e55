"""The rates and intervals shared by the toy world's evaluation and its notebooks: a rate or a mean
with its 95% interval, the training check of a run, and the notebooks' rule for summarising a
setting over its seeds and for saying when two settings separate (the rule itself is written out
in the notebooks' "Mean, spread and interval over the seeds")."""

from __future__ import annotations

import json
import os

import numpy as np

from ipadapter_jax import evaluate

# ----- One run's measures ------------------------------------------------------------------------


def rate(hits) -> dict:
  """`evaluate.rate`, which needs at least one trial, or, without any, the rate 0 with the
  interval that knows nothing: [0, 1] (a setting where the judge found nothing to count)."""
  return evaluate.rate(hits) if len(hits) else {"rate": 0.0, "ci95": [0.0, 1.0], "n": 0}


def mean_ci(values) -> dict:
  """{"mean", "ci95", "n"}: a mean with its normal-approximation 95% interval."""
  values = np.asarray(values, np.float64)
  half = evaluate.Z_95 * values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else 0.0
  mean = float(values.mean())
  return {"mean": mean, "ci95": [mean - float(half), mean + float(half)], "n": int(values.size)}


def pct(m: dict) -> str:
  """A rate with its 95% interval, in whole percent: the tables' cells."""
  return f"{m['rate']:.0%} [{m['ci95'][0]:.0%}, {m['ci95'][1]:.0%}]"


# ----- Training runs -----------------------------------------------------------------------------


def losses(stage_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, losses) logged by a train.py run in its metrics.jsonl."""
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  rows = [r for r in rows if "loss" in r]  # validation lines carry eval/* scores only
  return np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])


def check_training(stage_dir: str, name: str) -> tuple[np.ndarray, np.ndarray]:
  """`losses(stage_dir)`, after checking that the run trained: no measure of a diverged run or of
  one that learnt nothing is worth comparing. The losses are finite and, from 8 logged on (long
  enough to judge), lower over the last quarter than over the first. AssertionError otherwise
  (raised, not asserted: the check holds under python -O too)."""
  steps, loss = losses(stage_dir)
  if not np.all(np.isfinite(loss)):
    raise AssertionError(f"{name}: non-finite loss")
  if len(loss) >= 8:
    q = len(loss) // 4
    if not loss[-q:].mean() < loss[:q].mean():
      raise AssertionError(f"{name}: loss did not fall")
  return steps, loss


# ----- Over the seeds ----------------------------------------------------------------------------


def combine(measures: list[dict]) -> dict:
  """One metric of one setting over its seeds, from the per-seed {"mean" or "rate", "ci95", "n"}:
  {"mean", "ci95", "range", "values", "n"}. The mean and the range are the per-seed values'; the
  interval is, for a rate, Wilson on the hits pooled over the seeds, and for a mean, the per-seed
  half-widths h combined as the standard error of a mean of k equal means, sqrt(mean(h^2) / k).
  ci95 is None where a seed has no interval (`ipadapter-jax evaluate`'s means only)."""
  is_rate = "rate" in measures[0]
  values = [float(m["rate"] if is_rate else m["mean"]) for m in measures]
  mean = float(np.mean(values))
  n = sum(int(m["n"]) for m in measures)
  if is_rate:
    hits = sum(int(round(m["rate"] * m["n"])) for m in measures)
    ci95 = list(evaluate.wilson_interval(hits, n))
  elif any(m["ci95"] is None for m in measures):
    ci95 = None
  else:
    halves = np.array([(m["ci95"][1] - m["ci95"][0]) / 2 for m in measures])
    half = float(np.sqrt(np.mean(halves**2) / len(measures)))
    ci95 = [mean - half, mean + half]
  return {"mean": mean, "ci95": ci95, "range": [min(values), max(values)], "values": values, "n": n}


def aggregate(rows: list[dict], keys) -> dict:
  """{metric: combine(...)} of one setting's per-seed rows (`score_settings`' rows)."""
  return {key: combine([row[key] for row in rows]) for key in keys}


def apart(a, b) -> bool:
  """Whether the intervals [lo, hi] a and b do not overlap."""
  return a[0] > b[1] or b[0] > a[1]


def separation(a: dict, b: dict) -> int:
  """+1 where the aggregate `a` is above `b` on both its interval and its seed range, -1 where
  below, else 0: an interval alone is narrow (the seeds share the prompt images), a seed range
  alone ignores the prompt images. Without intervals nothing separates."""
  if a["ci95"] is None or b["ci95"] is None:
    return 0
  if a["ci95"][0] > b["ci95"][1] and a["range"][0] > b["range"][1]:
    return 1
  if b["ci95"][0] > a["ci95"][1] and b["range"][0] > a["range"][1]:
    return -1
  return 0


def overlap_reason(pairs) -> str:
  """Why none of these (a, b) pairs of aggregates separates, for the notebooks' sentences."""
  if any(a["ci95"] is None or b["ci95"] is None for a, b in pairs):
    return "no 95% intervals to compare"
  intervals = all(not apart(a["ci95"], b["ci95"]) for a, b in pairs)
  ranges = all(not apart(a["range"], b["range"]) for a, b in pairs)
  if intervals and ranges:
    return "intervals and seed ranges overlap"
  if intervals:
    return "intervals overlap"
  if ranges:
    return "seed ranges overlap"
  return "intervals or seed ranges overlap"


# ----- Printing ----------------------------------------------------------------------------------


def fmt(key: str, x: float) -> str:
  """A value of metric `key`: CLIP scores to 3 decimals, rates in percent to one decimal."""
  return f"{x:.3f}" if key.startswith("clip") else f"{x:.1%}"


def summary(key: str, agg: dict) -> str:
  """A table cell: mean [interval] (lowest-highest seed); no interval where there is none."""
  interval = (
    "" if agg["ci95"] is None else f" [{fmt(key, agg['ci95'][0])}, {fmt(key, agg['ci95'][1])}]"
  )
  low, high = agg["range"]
  return f"{fmt(key, agg['mean'])}{interval} ({fmt(key, low)}-{fmt(key, high)})"


def error_bars(aggs: list[dict]) -> np.ndarray:
  """matplotlib's asymmetric yerr (2, len(aggs)) of a list of aggregates: from the mean to its
  interval's ends, clipped at 0 (the seeds' mean can fall outside a pooled interval, and
  matplotlib refuses negative bars); no bar where there is no interval."""
  low = [0.0 if a["ci95"] is None else max(0.0, a["mean"] - a["ci95"][0]) for a in aggs]
  high = [0.0 if a["ci95"] is None else max(0.0, a["ci95"][1] - a["mean"]) for a in aggs]
  return np.array([low, high])
