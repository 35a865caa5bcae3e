"""Answer extraction and normalisation, and evaluate()'s grading, files and generation path."""

import json

import pytest

from motab import engine as engine_module
from motab import evaluate as evaluate_module
from motab.engine import Trajectory
from motab.evaluate import answers_match, evaluate, extract_boxed, normalize_answer
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


def test_grading_aggregation_and_files(tmp_path, monkeypatch):
    """Two problems × two samples with planted completions: pass@1 is the mean share correct."""
    words = ["\\boxed{", "}", "3/4", "0.75", "5", "7", "so"]
    tokenizer = word_tokenizer(words, "so")
    planted = {0: ["so \\boxed{ 0.75 }", "\\boxed{ 5 }"], 1: ["\\boxed{ 7 }", "\\boxed{ 7 }"]}

    def fake_rollout(student, teacher, prompts, config, seeds, tokenizer):
        assert student is None and config.mode == "off_policy"
        out = []
        for prompt, seed in zip(prompts, seeds):
            problem, sample = divmod(seed, 2)
            out.append(Trajectory(list(prompt), tokens=tokenizer.encode(planted[problem][sample])))
        return out

    # generate rolls out through motab.engine.rollout_in_batches
    monkeypatch.setattr(engine_module, "rollout", fake_rollout)
    monkeypatch.setattr(engine_module, "paged_for_rollouts", lambda model, *args: model)
    result = evaluate("model", tokenizer, [[0], [1]], ["3/4", "7"], samples=2, batch_size=3, out_dir=tmp_path)
    assert [p["correct"] for p in result.per_problem] == [[True, False], [True, True]]
    assert result.accuracy == pytest.approx(0.75)
    lines = (tmp_path / "problems.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["extracted"] == ["0.75", "5"]
    assert json.loads((tmp_path / "summary.json").read_text())["accuracy"] == pytest.approx(0.75)


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
