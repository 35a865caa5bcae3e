"""Answer extraction and normalisation, the answer formats' registry, and evaluate()'s grading,
files and generation path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from motab import engine as engine_module
from motab import evaluate as evaluate_module
from motab.engine import Trajectory
from motab.evaluate import (
    AnswerFormat,
    answer_formats,
    answers_match,
    evaluate,
    extract_answer,
    extract_boxed,
    get_answer_format,
    normalize_answer,
    register_answer_format,
)
from tests.tiny import tiny_qwen2, word_tokenizer


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        (r"\boxed{ \{1, 2\} }", r"\{1, 2\}"),
        (r"answer: \boxed{x^{2}+1}", "x^{2}+1"),
        (r"\fbox{7}", "7"),
        ("no box here", None),
        (r"\boxed{unclosed", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "predicted,reference,same",
    [
        ("1,000", "1000", True),
        ("1,234,567", "1234567", True),
        # a comma that is not a thousands separator separates values: never dropped
        ("1,2", "12", False),
        ("1, 2", "12", False),
        ("12,34", "1234", False),
        ("1,2345", "12345", False),
        (r"\{1,2\}", r"\{12\}", False),
        ("1000.0", "1000", True),
        (r"\frac{6}{8}", "3/4", True),
        (r"\dfrac{3}{4}", "0.75", True),
        ("$x = 5$", "5", True),
        (r"\text{ 12 }", "12", True),
        (r"\left( 1, 2 \right)", "(1,2)", True),
        ("-3", "3", False),
        ("1/0", "1/0", True),  # not a number: compared as text
        ("7", "8", False),
    ],
)
def test_answers_match(predicted, reference, same):
    assert answers_match(predicted, reference) is same
    assert answers_match(None, reference) is False


def test_normalize_is_canonical():
    assert normalize_answer("  0.50 ") == normalize_answer(r"\frac{1}{2}") == "1/2"


def plant(monkeypatch, planted: dict[int, list[str]]) -> None:
    """Generation writes ``planted[problem][sample]`` (seeds are problem × 2 + sample)."""

    def fake_rollout(student, teacher, prompts, config, seeds, tokenizer, max_rows, on_finished):
        assert student is None and config.mode == "off_policy"
        out = []
        for index, (prompt, seed) in enumerate(zip(prompts, seeds)):
            problem, sample = divmod(seed, 2)
            out.append(Trajectory(list(prompt), tokens=tokenizer.encode(planted[problem][sample])))
            on_finished(index, out[-1])
        return out

    # generate rolls out through motab.engine.rollout_in_batches
    monkeypatch.setattr(engine_module.api, "rollout", fake_rollout)


def test_grading_aggregation_and_files(tmp_path, monkeypatch):
    """Two problems × two samples with planted completions: pass@1 is the mean share correct."""
    words = ["\\boxed{", "}", "3/4", "0.75", "5", "7", "so"]
    tokenizer = word_tokenizer(words, "so")
    plant(monkeypatch, {0: ["so \\boxed{ 0.75 }", "\\boxed{ 5 }"], 1: ["\\boxed{ 7 }", "\\boxed{ 7 }"]})
    result = evaluate("model", tokenizer, [[0], [1]], ["3/4", "7"], samples=2, batch_size=3, out_dir=tmp_path)
    assert [p["correct"] for p in result.per_problem] == [[True, False], [True, True]]
    assert result.accuracy == pytest.approx(0.75)
    lines = (tmp_path / "problems.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["extracted"] == ["0.75", "5"]
    assert json.loads((tmp_path / "summary.json").read_text())["accuracy"] == pytest.approx(0.75)


@pytest.fixture
def registry(monkeypatch):
    """The formats registered in a test are forgotten after it."""
    monkeypatch.setattr(evaluate_module, "_FORMATS", dict(evaluate_module._FORMATS))


def test_a_registered_format_grades_by_name(tmp_path, monkeypatch, registry):
    """A custom format that grades the whole completion (as math-verify does), not the extracted
    answer: evaluate finds it by name, records what it extracts and counts what it grades."""
    letter = AnswerFormat(
        "letter",
        extract=lambda completion: next((w for w in reversed(completion.split()) if w in "ABCD"), None),
        is_correct=lambda completion, reference: completion.split()[0] == reference,
    )
    assert register_answer_format(letter) is letter and "letter" in answer_formats()
    assert register_answer_format(letter) is letter  # the same format again: nothing changes
    with pytest.raises(ValueError, match="'letter' is already registered"):
        register_answer_format(AnswerFormat("letter", extract=str.strip))
    assert get_answer_format("letter") is letter and extract_answer("so B", "letter") == "B"

    tokenizer = word_tokenizer(["?", "so", "A", "B", "C"], "?")
    plant(monkeypatch, {0: ["B so A", "A so B"], 1: ["C", "so C"]})
    result = evaluate("model", tokenizer, [[0], [1]], ["B", "C"], samples=2, answer_format="letter", out_dir=tmp_path)
    assert [p["extracted"] for p in result.per_problem] == [["A", "B"], ["C", "C"]]
    assert [p["correct"] for p in result.per_problem] == [[True, False], [True, False]]
    assert result.accuracy == pytest.approx(0.5)
    # a format can also be passed as a value, registered or not
    unregistered = AnswerFormat("first-word", extract=lambda completion: completion.split()[0])
    result = evaluate("model", tokenizer, [[0], [1]], ["B", "C"], samples=2, answer_format=unregistered)
    assert [p["correct"] for p in result.per_problem] == [[True, False], [True, False]]
    assert "first-word" not in answer_formats()

    replaced = AnswerFormat("letter", extract=str.strip)
    assert register_answer_format(replaced, replace=True) is get_answer_format("letter") is replaced


def test_an_unknown_format_is_refused_before_generation(monkeypatch):
    def no_rollout(*args, **kwargs):
        raise AssertionError("generated before checking the answer format")

    monkeypatch.setattr(engine_module.api, "rollout", no_rollout)
    with pytest.raises(ValueError, match=r"unknown answer format 'nope'; registered: 'boxed'"):
        evaluate("model", word_tokenizer(["so"], "so"), [[0]], ["1"], answer_format="nope")
    with pytest.raises(ValueError, match="unknown answer format"):
        extract_answer(r"\boxed{1}", "nope")
    with pytest.raises(TypeError, match="expected an AnswerFormat"):
        register_answer_format("toy")


def test_the_demo_registers_the_toy_format(tmp_path, monkeypatch):
    """``answer_format="toy"`` (``motab eval --answer-format toy``) grades the toy task's first
    ``#d``, as the demo grades it, once ``motab.demo`` is imported."""
    import motab.demo

    assert get_answer_format("toy") is motab.demo.TOY_ANSWER_FORMAT
    tokenizer = word_tokenizer(["c=1+2=3", "#3", "#4", "so"], "so")
    plant(monkeypatch, {0: ["c=1+2=3 #3 #4", "#4 #3"], 1: ["so", "#4"]})
    result = evaluate("model", tokenizer, [[0], [1]], ["3", "4"], samples=2, answer_format="toy", out_dir=tmp_path)
    assert [p["extracted"] for p in result.per_problem] == [["3", "4"], [None, "4"]]
    assert [p["correct"] for p in result.per_problem] == [[True, False], [False, True]]


def test_evaluate_imports_no_toy_module():
    """The grading core knows no task: importing it loads nothing of ``motab.toy`` and registers
    ``boxed`` alone; the demo, a front end, brings ``toy``."""
    code = (
        "import sys, motab.evaluate as e\n"
        "print(sorted(m for m in sys.modules if m.startswith('motab.toy')), e.answer_formats())\n"
        "import motab.demo\n"
        "print(e.answer_formats())"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["[] ('boxed',)", "('boxed', 'toy')"]


def test_generation_path_runs_on_a_tiny_model(tmp_path):
    words = [f"w{i}" for i in range(60)]
    tokenizer = word_tokenizer(words, "w0")
    model = tiny_qwen2(0, hidden=32, layers=1, vocab=60, initializer_range=0.02).eval()
    result = evaluate(model, tokenizer, [[1, 2], [3]], ["1", "2"], samples=2, max_new_tokens=5, out_dir=tmp_path)
    assert result.accuracy == 0.0  # random words hold no \boxed answer
    assert all(len(p["completions"]) == 2 for p in result.per_problem)
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        evaluate(model, tokenizer, [[1], [2]], ["1"])


def test_generation_shows_rows_and_tokens_per_second_on_stderr(capsys):
    words = [f"w{i}" for i in range(60)]
    tokenizer = word_tokenizer(words, "w0")
    model = tiny_qwen2(0, hidden=32, layers=1, vocab=60, initializer_range=0.02).eval()
    evaluate_module.generate(model, tokenizer, [[1, 2], [3], [4]], max_new_tokens=4, batch_size=2, progress=True)
    shown = capsys.readouterr()
    assert "3/3" in shown.err and "tokens/s" in shown.err and "tokens/s" not in shown.out
    # None: only on a terminal, and pytest's captured stderr is none
    evaluate_module.generate(model, tokenizer, [[1, 2]], max_new_tokens=4, progress=None)
    assert capsys.readouterr().err == ""
