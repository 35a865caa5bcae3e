"""The shipped toy teacher and `motab demo --quick` (the README's first command, at smoke size)."""

import json
import math
import re

import pytest
import torch

from motab.config import ConfigError
from motab.demo import (
    FULL,
    METHODS,
    QUICK,
    SHARED_OPTIONS,
    TUNING_GRID,
    method_config,
    run_demo,
    teacher_guidance,
    tuned_options,
    tuning_record_path,
)
from motab.demo.run import STUDENT_SHAPE, weights_digest
from motab.demo.toy_models import greedy_accuracy, toy_model
from motab.demo.tune import check_distinct, merge, tune
from motab.toy.task import generate_split
from motab.toy.teacher import load_teacher, teacher_path


def test_shipped_teacher_reaches_its_recorded_accuracy():
    record = json.loads((teacher_path() / "training.json").read_text())
    teacher, tokenizer = load_teacher()
    n = 100
    accuracy = greedy_accuracy(teacher, tokenizer, generate_split("test", n))
    # the record is over 500 test problems; a sample of the first 100 may differ by sampling error only
    slack = 3 * math.sqrt(max(record["test_accuracy"] * (1 - record["test_accuracy"]), 0.01) / n)
    assert accuracy >= record["test_accuracy"] - slack, (accuracy, record["test_accuracy"])
    assert (teacher_path() / "model.safetensors").stat().st_size <= 20 * 2**20


def test_quick_demo_writes_the_report(tmp_path):
    results = run_demo(tmp_path, quick=True, progress=False)
    for name in ("results.json", "accuracy.png", "rollout.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["methods"]) == set(METHODS)
    runs = {(r["method"], r["budget"]): r for r in results["runs"]}  # one seed: one run per method and budget
    clock = runs["on_policy", "steps"]["train_seconds"]
    for method, by_budget in saved["methods"].items():
        for budget, row in by_budget.items():
            run = runs[method, budget]
            assert row["test_accuracy_mean"] == run["test_accuracy"]  # the table is the evaluation's number
            correct = run["test_accuracy"] * QUICK.test  # a share of the QUICK.test problems
            assert abs(correct - round(correct)) < 1e-9, (method, budget, correct)
        # equal wall clock: the steps that fit in on_policy's training time at the method's own pace
        own = runs[method, "steps"]
        assert own["steps"] == QUICK.steps
        assert runs[method, "time"]["steps"] == max(1, round(QUICK.steps * clock / own["train_seconds"]))
    assert runs["on_policy", "time"] == dict(runs["on_policy", "steps"], budget="time")  # the clock's own run
    assert saved["teacher_validation_accuracy"] >= 0.9  # the shipped teacher solves the task
    assert saved["methods"]["off_policy"]["steps"]["student_tokens"] == 0
    assert saved["methods"]["on_policy"]["steps"]["teacher_tokens"] == 0
    # the paper's pipeline: the SFT trains as many records as the online methods train rollouts
    assert saved["methods"]["teacher_steps"]["steps"]["student_tokens"] == 0
    paper = runs["step_motab", "steps"]
    assert 0 < paper["synthesis_seconds"] < paper["train_seconds"] and 0 <= paper["breach_rate"] <= 1
    assert paper["student_tokens"] > 0
    assert set(saved["teacher_decay"][0]) == {"0", "4", "8", "16", "24"}
    guidance = saved["teacher_guidance"][0]
    assert set(guidance) == {"first_wrong", "teacher_right_at_first", "consistent", "true", "other"}
    assert 0 <= guidance["teacher_right_at_first"] <= guidance["first_wrong"] <= QUICK.validation
    # the record says how to run it again, on what code and machine, and under what load
    facts = saved["provenance"]
    assert facts["command"] == f"motab demo --quick --out {tmp_path}" and facts["seconds"] >= 1
    assert facts["commit"] is None or re.fullmatch(r"[0-9a-f]{40}\+?", facts["commit"])
    assert len(facts["load_at_start"]) == 3 and facts["torch"] == torch.__version__


def test_teacher_guidance_counts_nothing_for_a_student_that_makes_no_mistake():
    teacher, tokenizer = load_teacher()
    counts = teacher_guidance(teacher, teacher, tokenizer, generate_split("validation", 24))
    assert counts == dict(first_wrong=0, teacher_right_at_first=0, consistent=0, true=0, other=0)


def test_method_config_applies_a_methods_options_over_the_shared_ones(tmp_path):
    _, tokenizer = load_teacher()
    config = method_config(
        tokenizer, "motab", {"train.learning_rate": 3e-3, "monitor.window_factor": 2.0}, QUICK, tmp_path, seed=5
    )
    assert config.rollout.mode == "motab" and config.seed == 5 and config.steps == QUICK.steps
    assert config.learning_rate == 3e-3 and config.rollout.monitor.window_factor == 2.0
    assert config.rollout.monitor.window == SHARED_OPTIONS["monitor"]["window"]
    assert config.rollout.delimiter_token_ids, "the tokenizer's step delimiters are filled in"
    with pytest.raises(ConfigError, match="SECTION.KEY"):
        method_config(tokenizer, "motab", {"window_factor": 2.0}, QUICK, tmp_path, seed=0)
    with pytest.raises(ConfigError, match="unknown monitor options"):
        method_config(tokenizer, "motab", {"monitor.windw": 2}, QUICK, tmp_path, seed=0)


def test_the_papers_methods_synthesize_with_the_toy_preset(tmp_path):
    _, tokenizer = load_teacher()
    config = method_config(tokenizer, "step_motab", {"monitor.epsilon0": 0.5}, QUICK, tmp_path, seed=0)
    assert config.rollout.step_stop == "\n\n" and config.rollout.monitor.epsilon0 == 0.5
    assert config.rollout.student_sampling.temperature == config.rollout.teacher_sampling.temperature == 0.6
    online = method_config(tokenizer, "motab", {}, QUICK, tmp_path, seed=0)
    assert online.rollout.student_sampling.temperature == SHARED_OPTIONS["student_sampling"]["temperature"]


def test_a_tuning_of_some_methods_merges_into_the_record():
    record = dict(seed=0, size={"steps": 2}, runs=[dict(method="a", x=1), dict(method="b", x=1)], chosen=dict(a=1, b=1))
    addition = dict(seed=0, size={"steps": 2}, runs=[dict(method="b", x=2)], chosen=dict(b=2), seconds=1, date="d")
    addition.update(machine="m", command="c")
    merged = merge(record, addition)
    assert merged["runs"] == [dict(method="a", x=1), dict(method="b", x=2)] and merged["chosen"] == dict(a=1, b=2)
    assert merged["additions"][0]["methods"] == ["b"]
    with pytest.raises(ValueError, match="same warm start"):
        merge(record, dict(addition, seed=1))


def test_the_demo_runs_the_settings_its_tuning_record_chose():
    record = json.loads(tuning_record_path().read_text())
    assert record["size"] == FULL.__dict__, "tuned at the demo's own budget"
    for method, grid in TUNING_GRID.items():
        runs = [r for r in record["runs"] if r["method"] == method]
        assert [r["options"] for r in runs] == grid, f"{method}: the record is of another grid"
        best = max(runs, key=lambda r: r["validation_accuracy"])
        assert record["chosen"][method] == best["options"]
    assert len({len(grid) for grid in TUNING_GRID.values()}) == 1, "the same tuning budget for every method"


def option_value(config, key: str):
    """The value a ``SECTION.KEY`` option took in a TrainConfig."""
    section, name = key.split(".")
    if section == "train":
        return getattr(config, name)
    holder = config.rollout if section == "rollout" else getattr(config.rollout, section)
    return getattr(holder, name)


def test_the_demo_trains_each_method_with_the_setting_its_record_chose(tmp_path, monkeypatch):
    """run_demo reads each method's choice from the tuning record and trains with it: a record
    whose choices are planted (a learning rate of each method's own, the tuned option kept) must
    reach every method's training configuration at both budgets, and the run's record."""
    import motab.demo.run as demo

    record = json.loads(tuning_record_path().read_text())
    planted = {
        method: {**record["chosen"][method], "train.learning_rate": 1e-4 * (n + 1)} for n, method in enumerate(METHODS)
    }
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(dict(record, chosen=planted)))
    monkeypatch.setattr(demo, "tuning_record_path", lambda: path)
    trained = []

    def recorded_run(student, teacher, tokenizer, train, validation, config, progress=True):
        trained.append(config)
        return dict(
            method=config.rollout.mode, steps=config.steps, curve=[(0, 0.5), (config.steps, 0.5)],
            validation_accuracy=0.5, interventions_per_100=0.0, student_tokens=1, teacher_tokens=1,
            train_seconds=1.0 + METHODS.index(config.rollout.mode),  # every method but the clock moves
        )  # fmt: skip

    monkeypatch.setattr(demo, "run_method", recorded_run)
    monkeypatch.setattr(demo, "warm_student", lambda tokenizer, seed, size, device="cpu": torch.nn.Linear(1, 1))
    monkeypatch.setattr(demo, "greedy_accuracy", lambda *args, **kwargs: 0.5)
    monkeypatch.setattr(demo, "teacher_decay", lambda *args: {})
    monkeypatch.setattr(demo, "teacher_guidance", lambda *args: {})
    monkeypatch.setattr(demo, "test_grades", lambda *args: dict.fromkeys(
        ("test_accuracy", "test_accuracy_last_answer", "test_marker_share"), 0.5
    ))  # fmt: skip
    monkeypatch.setattr(demo, "_render_rollout", lambda *args: None)
    monkeypatch.setattr(demo, "format_table", lambda results: "")
    results = run_demo(tmp_path / "demo", quick=True, progress=False)
    modes = [config.rollout.mode for config in trained]
    assert set(modes) == set(METHODS) and len(modes) == 2 * len(METHODS) - 1  # on_policy's clock run is its own
    for config in trained:
        for key, value in planted[config.rollout.mode].items():
            assert option_value(config, key) == value, (config.rollout.mode, key)
    assert all(run["options"] == planted[run["method"]] for run in results["runs"])


def test_tune_picks_the_best_validation_setting_and_wants_equal_budgets():
    grid = {method: [settings[0], settings[-1]] for method, settings in TUNING_GRID.items()}
    record = tune(grid, QUICK, seed=0, jobs=1)
    assert len(record["runs"]) == 2 * len(METHODS)
    for method in METHODS:
        runs = [r for r in record["runs"] if r["method"] == method]
        for run in runs:
            correct = run["validation_accuracy"] * QUICK.validation  # a share of the validation problems
            assert abs(correct - round(correct)) < 1e-9
            assert tuple(run["curve"][-1]) == (QUICK.steps, run["validation_accuracy"])  # its curve's last point
        assert record["chosen"][method] == max(runs, key=lambda r: r["validation_accuracy"])["options"]
    with pytest.raises(ValueError, match="same tuning budget"):
        tune({"motab": grid["motab"], "skd": grid["skd"][:1]}, QUICK)


def test_tune_refuses_settings_that_train_identical_weights():
    runs = [
        dict(method="off_policy", options={"teacher_sampling.temperature": 0.0}, weights_digest="same"),
        dict(method="off_policy", options={"teacher_sampling.temperature": 0.7}, weights_digest="same"),
        dict(method="motab", options={}, weights_digest="same"),
    ]
    with pytest.raises(ValueError, match="trained identical weights"):
        check_distinct(runs)
    check_distinct(runs[1:])  # two methods may well meet: only one method's own settings must differ


def test_weights_digest_tells_weights_apart():
    _, tokenizer = load_teacher()
    one, other = toy_model(tokenizer, STUDENT_SHAPE, 0), toy_model(tokenizer, STUDENT_SHAPE, 0)
    assert weights_digest(one) == weights_digest(other)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-6
    assert weights_digest(one) != weights_digest(other)


def test_teacher_guidance_reads_the_teachers_choice_at_each_operand(monkeypatch):
    """A planted student solution with a wrong operand; each count is checked against the teacher's
    greedy choice computed independently, one prefix at a time."""
    import torch

    import motab.demo.toy_models
    from motab.toy.task import ToyProblem, operand_checks

    teacher, tokenizer = load_teacher()
    problem = ToyProblem("a=3 b=9 c=a*b d=c+b e=c-d ?e\n", "c=3*9=7\n\nd=7+9=6\n\ne=7-6=1\n\n#1", "1")
    completion = "c=3*3=9\n\nd=9+9=8\n\ne=9-8=1\n\n#1"
    tokens = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
    monkeypatch.setattr(motab.demo.toy_models, "generate", lambda *args, **kwargs: [tokens])
    counts = teacher_guidance(teacher, teacher, tokenizer, [problem])

    prompt = tokenizer(problem.prompt)["input_ids"]
    expected = dict(first_wrong=1, teacher_right_at_first=0, consistent=0, true=0, other=0)
    checks = operand_checks(problem, completion)
    for i, check in enumerate(checks):
        prefix = prompt + tokenizer(completion[: check.position])["input_ids"]
        with torch.no_grad():
            digit = tokenizer.decode([int(teacher(torch.tensor([prefix])).logits[0, -1].argmax())])
        if i == 1:  # the planted wrong operand
            expected["teacher_right_at_first"] += digit == str(check.consistent)
        elif i > 1 and check.consistent != check.true:
            kind = {str(check.consistent): "consistent", str(check.true): "true"}.get(digit, "other")
            expected[kind] += 1
    assert counts == expected
    assert expected["consistent"] + expected["true"] + expected["other"] == 3  # c twice and d differ from the problem


def test_the_quick_demos_plotted_rollout_shows_an_intervention(tmp_path):
    """rollout.png of `motab demo --quick` draws a MOTAB rollout that intervenes; the full demo's plot
    keeps its method's own settings. Checked on the quick demo's warm start with the plot's prompts
    and seed (the quick run trains it 3 steps more), without running the whole quick demo."""
    from motab.demo.run import as_problems, plotted_rollout_config, plotted_rollouts, warm_student

    teacher, tokenizer = load_teacher()
    config = method_config(tokenizer, "motab", tuned_options()["motab"], QUICK, tmp_path, 0)
    assert plotted_rollout_config(config.rollout, quick=False) == config.rollout
    student = warm_student(tokenizer, 0, QUICK)
    prompts = [p.prompt_ids for p in as_problems(tokenizer, generate_split("train", 4))]
    shown = plotted_rollouts(student, teacher, prompts, plotted_rollout_config(config.rollout, quick=True), 0)
    assert max(len(t.interventions) for t in shown) >= 1
