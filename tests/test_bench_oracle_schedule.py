"""bench/oracle_schedule.py changes only what it is asked to in the saved run config, and rejects typos."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from weakshot.config import RunConfig

_PATH = Path(__file__).resolve().parents[1] / "bench" / "oracle_schedule.py"
_spec = importlib.util.spec_from_file_location("oracle_schedule", _PATH)
oracle_schedule = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle_schedule)

SAVED = {
    "num_classes": 44,
    "method": {"supervision": "full"},
    "loss": {"class_weight": 1.0},
    "train": {"iterations": 500, "seed": 0, "lr": 0.001, "batch_size": 8, "log_every": 50},
}


def test_run_config_sets_steps_seed_and_overrides_and_leaves_the_rest():
    config = oracle_schedule.run_config(SAVED, 750, 2, {"train.lr": oracle_schedule.parse_value("0.002")})
    assert "num_classes" not in config
    assert config["train"] == {"iterations": 750, "seed": 2, "lr": 0.002, "batch_size": 8, "log_every": 50}
    assert config["loss"] == SAVED["loss"] and config["method"] == SAVED["method"]
    assert SAVED["train"]["iterations"] == 500 and "num_classes" in SAVED  # the saved config is not modified


def test_run_config_is_a_valid_run_config():
    config = oracle_schedule.run_config(SAVED, 600, 1, {"train.batch_size": 16})
    run = RunConfig.from_dict(config)
    assert (run.train.iterations, run.train.seed, run.train.batch_size) == (600, 1, 16)


@pytest.mark.parametrize(
    ("key", "message"), [("train.learning_rate", "no field 'learning_rate'"), ("optim.lr", "no section 'optim'")]
)
def test_run_config_rejects_a_field_the_config_does_not_have(key, message):
    with pytest.raises(SystemExit, match=message):
        oracle_schedule.run_config(SAVED, 500, 0, {key: 1})


def test_late_class_loss_averages_the_last_fifth(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [{"iteration": i, "loss_ce": float(i)} for i in (10, 390, 400, 410, 500)]
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert oracle_schedule.late_class_loss(log, 500) == pytest.approx((410 + 500) / 2)
    with pytest.raises(SystemExit, match="no logged step"):
        oracle_schedule.late_class_loss(log, 5000)
