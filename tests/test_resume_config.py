"""A resume compares the run's saved config with the new one: keys added to the configs since the
run started pass while they keep their off value, and count as changed otherwise."""

import json

import pytest

from ipadapter_jax.configs import sd15_ip_adapter
from ipadapter_jax.train.checks import TrainingError, check_resume


def _saved_without(tmp_path, cfg, key: str) -> None:
  saved = json.loads(cfg.to_json_best_effort())
  section, name = key.split(".")
  del saved[section][name]
  (tmp_path / "config.json").write_text(json.dumps(saved))


def test_a_key_added_since_the_run_started_passes_while_it_is_off(tmp_path):
  cfg = sd15_ip_adapter.get_config()
  _saved_without(tmp_path, cfg, "model.revision")
  assert cfg.model.revision == ""
  check_resume(cfg, str(tmp_path))  # a run saved before model.revision existed resumes


def test_a_key_added_since_the_run_started_counts_as_changed_when_set(tmp_path):
  cfg = sd15_ip_adapter.get_config()
  _saved_without(tmp_path, cfg, "model.revision")
  cfg.model.revision = "5f3c"
  with pytest.raises(TrainingError, match=r"model.revision: \(absent\) -> '5f3c'"):
    check_resume(cfg, str(tmp_path))
