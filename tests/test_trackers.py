"""``train.report_to``: each metrics line reaches the experiment trackers through transformers'
reporting callbacks (TensorBoard's event file read back), metrics.jsonl unchanged, and a tracker that
is unknown or not installed is refused in one line before any model work."""

from __future__ import annotations

import json

import numpy as np
import pytest

import motab.trainer
from motab.config import ConfigError, TrainConfig, apply_overrides, build_configs
from motab.trainer import Trackers
from tests.test_trainer import trainer


def test_tensorboard_gets_every_number_of_every_metrics_line(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # TensorBoard's default: output_dir/runs/
    history = trainer(tmp_path, steps=2, save_every=100, report_to="tensorboard").train(progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines == [json.dumps(metrics) for metrics in history]  # the file is as without a tracker
    (logs,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(logs))
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected = {}
    for metrics in map(json.loads, lines):
        for key, value in metrics.items():
            if value is not None:  # mean_score is null when no student token was scored
                expected.setdefault(f"train/{key}", []).append((metrics["step"], float(np.float32(value))))
    assert logged == expected and "train/loss" in logged  # TensorBoard keeps float32 scalars


def test_every_rank_checks_the_trackers_and_rank_0_alone_reports(tmp_path):
    pytest.importorskip("tensorboard")
    config = TrainConfig(output_dir=str(tmp_path), report_to="tensorboard")
    assert [type(c).__name__ for c in Trackers(config, rank=0).callbacks] == ["TensorBoardCallback"]
    assert Trackers(config, rank=1).callbacks == []
    assert Trackers(TrainConfig(output_dir=str(tmp_path)), rank=0).callbacks == []  # "none"


def test_an_unknown_tracker_is_refused_before_any_model_work(tmp_path, monkeypatch):
    def model_work(*args, **kwargs):
        raise AssertionError("the models were used before the tracker was checked")

    monkeypatch.setattr(motab.trainer, "shared_vocab", model_work)
    with pytest.raises(ConfigError) as error:
        trainer(tmp_path / "run", report_to=["tensorboard", "tensorbored"])
    message = str(error.value)
    assert message.startswith("train.report_to: unknown tracker 'tensorbored'; expected none, all or some of ")
    assert "tensorboard" in message and "wandb" in message and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_is_not_installed_is_refused(tmp_path, monkeypatch):
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    with pytest.raises(ConfigError) as error:
        trainer(tmp_path / "run", report_to="tensorboard")
    message = str(error.value)
    assert message.startswith("train.report_to: cannot report to tensorboard: TensorBoardCallback requires tensorboard")
    assert "\n" not in message


def test_report_to_is_a_name_or_a_list_in_yaml_and_set():
    def train_config(*overrides: str) -> TrainConfig:
        raw = {"student": "s", "teacher": "t", "data": "d"}
        apply_overrides(raw, list(overrides))
        return build_configs(raw)[0]

    assert train_config().trackers == ()  # "none", the default
    assert train_config("train.report_to=tensorboard").trackers == ("tensorboard",)
    assert train_config("train.report_to=[tensorboard, wandb]").report_to == ("tensorboard", "wandb")
    with pytest.raises(ConfigError, match=r"train\.report_to must be a string or a list of strings, got 3"):
        train_config("train.report_to=3")
    with pytest.raises(ConfigError, match=r"train\.report_to takes none and all alone"):
        train_config("train.report_to=[none, wandb]")
