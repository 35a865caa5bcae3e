"""The shipped toy teacher and `motab demo --quick` (the README's first command, at smoke size)."""

import json
import math

from motab.demo import METHODS, load_teacher, run_demo, teacher_path
from motab.toy.task import generate_split
from motab.toy.train_teacher import greedy_accuracy


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
    for method, row in saved["methods"].items():
        assert 0.0 <= row["test_accuracy_mean"] <= 1.0
        runs = [r for r in results["runs"] if r["method"] == method]
        assert row["test_accuracy_mean"] == runs[0]["test_accuracy"]  # the table is the evaluation's number
    assert saved["methods"]["off_policy"]["student_tokens"] == 0
    assert saved["methods"]["on_policy"]["teacher_tokens"] == 0
    assert set(saved["teacher_decay"][0]) == {"0", "4", "8", "16", "24"}
