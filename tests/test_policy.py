"""Each mode is one ``Policy`` value and ``resolve`` settles a run's settings in one place: what
``motab rollout`` and ``motab train`` print as the resolved configuration is, field for field,
the configuration the engine runs with, for every mode."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import yaml

from motab.cli import main
from motab.config import MODES, MonitorConfig, RolloutConfig
from motab.engine.rounds import Rounds
from motab.policy import POLICIES, STEP_MODES, policy_of, resolve
from tests.test_cli import workspace  # noqa: F401  (the tiny models on disk)


def test_every_mode_has_a_policy_and_only_step_policies_write_steps():
    assert tuple(POLICIES) == MODES
    assert STEP_MODES == ("step_motab", "step_skd", "teacher_steps")
    assert [m for m in MODES if policy_of(m).needs_student] == [m for m in MODES if POLICIES[m].writer == "student"]
    assert {m for m in MODES if not policy_of(m).monitors} == {"on_policy", "off_policy", "teacher_steps"}
    assert {m for m in MODES if policy_of(m).student_resumes} == {"motab", "skd", "step_skd"}


@pytest.mark.parametrize("mode", MODES)
def test_resolve_imposes_the_modes_monitor_settings_once(mode):
    user = RolloutConfig(mode=mode, monitor=MonitorConfig(score="jsd", rule="ema", warmup=5, temperature=2.0))
    config, policy = resolve(user)
    assert policy is POLICIES[mode]
    imposed = dict(policy.monitor)
    for name, value in asdict(user.monitor).items():
        assert getattr(config.monitor, name) == imposed.get(name, value), name
    assert resolve(config)[0] == config  # settled: resolving again changes nothing
    assert replace(config, monitor=user.monitor) == user  # nothing but the monitor moved


def printed_config(out: str) -> dict:
    return yaml.safe_load(out.split("resolved config:\n", 1)[1].split("\nwrote ", 1)[0])


def plain(value) -> dict:
    return json.loads(json.dumps(asdict(value), default=str))


@pytest.fixture
def engine_configs(monkeypatch):
    """Every configuration an engine was built with, in order."""
    seen = []
    build = Rounds.__init__

    def capture(self, student, teacher, config, *args, **kwargs):
        seen.append(config)
        build(self, student, teacher, config, *args, **kwargs)

    monkeypatch.setattr(Rounds, "__init__", capture)
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_rollout_prints_the_configuration_the_engine_runs(workspace, engine_configs, mode, capsys):  # noqa: F811
    models = ["--student", workspace["student"], "--teacher", workspace["teacher"], "--data", workspace["data"]]
    out = workspace["root"] / f"policy-{mode}.jsonl"
    settings = ["monitor.score=jsd", "monitor.rule=ema", "monitor.warmup=3", "rollout.max_new_tokens=6"]
    args = ["rollout", *models, "--mode", mode, "--limit", "2", "--out", str(out)]
    assert main(args + [f"--set={s}" for s in settings]) == 0
    printed = printed_config(capsys.readouterr().out)
    assert engine_configs and all(c == engine_configs[0] for c in engine_configs)
    assert printed["rollout"] == plain(engine_configs[0])
    assert printed["rollout"]["mode"] == mode


@pytest.mark.parametrize("mode", ["skd", "step_motab"])
def test_train_prints_the_configuration_the_engine_runs(workspace, engine_configs, mode, capsys, tmp_path):  # noqa: F811
    models = ["--student", workspace["student"], "--teacher", workspace["teacher"], "--data", workspace["data"]]
    settings = ["train.prompts_per_step=2", "train.micro_batch=2", "rollout.max_new_tokens=6", "monitor.warmup=3"]
    args = ["train", *models, "--mode", mode, "--steps", "1", "--output-dir", str(tmp_path / "run")]
    assert main(args + [f"--set={s}" for s in settings]) == 0
    printed = printed_config(capsys.readouterr().out)
    assert engine_configs and all(c == engine_configs[0] for c in engine_configs)
    assert printed["rollout"] == plain(engine_configs[0])
    assert printed["rollout"]["monitor"]["score"] == dict(POLICIES[mode].monitor)["score"]
