"""Grading as the field grades (math-verify, multiple choice, thinking models), pass@k against the
closed form, the answer formats' registry, and evaluate()'s generation path on a tiny model."""

import json
import subprocess
import sys
import threading
from math import comb
from pathlib import Path

import pytest

from motab import engine as engine_module
from motab import evaluate as evaluate_module
from motab.engine import Trajectory
from motab.evaluate import (
    AnswerFormat,
    answer_formats,
    answer_part,
    evaluate,
    extract_answer,
    extract_boxed,
    extract_choice,
    get_answer_format,
    is_correct,
    pass_at_k,
    register_answer_format,
)
from motab.evaluate.formats import _FORMATS
from motab.evaluate.metrics import default_ks, mean_and_error, overall, score
from tests.tiny import tiny_qwen2, word_tokenizer

# Equivalences a MATH-500 / AIME grader must accept: (completion, reference).
MATH_EQUAL = [
    (r"so the answer is \boxed{\dfrac{\sqrt2}{2}}", r"\frac{\sqrt{2}}{2}"),  # \dfrac, \sqrt2
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}"),
    (r"\boxed{-\frac34}", "-0.75"),  # fraction vs decimal
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}"),  # radicals simplified
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{27}", "27.0"),  # AMC files store integers as floats
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}"),  # sets in any order
    (r"\boxed{2, 1}", "1, 2"),
    (r"\boxed{(0, 1]}", "(0,1]"),  # intervals
    (r"\boxed{5^\circ}", "5"),  # degrees
    (r"\boxed{50}", r"50\%"),  # percent
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}"),  # text answers
    (r"\boxed{1+x^2}", "x^2+1"),
    (r"\boxed{x = 3}", "3"),
    ("The final answer is 3.", "3"),  # no box: the last expression
]
# ... and what must stay wrong.
MATH_WRONG = [
    (r"\boxed{0.5}", "50"),
    (r"\boxed{[0, 1]}", "(0,1]"),  # a closed end is another interval
    (r"\boxed{\{1, 2\}}", r"\{1,2,3\}"),
    (r"\boxed{\sqrt{3}}", r"2\sqrt{3}"),
    (r"\boxed{4}", "3"),
    (r"\boxed{\text{Adam}}", r"\text{Evelyn}"),
    (r"\boxed{-\frac34}", "0.75"),
    ("no answer at all", "3"),
]


@pytest.mark.parametrize("completion,reference", MATH_EQUAL)
def test_math_accepts_equivalent_answers(completion, reference):
    assert is_correct(completion, reference) is True
    assert is_correct(completion, reference, answer_format="math") is True


@pytest.mark.parametrize("completion,reference", MATH_WRONG)
def test_math_refuses_different_answers(completion, reference):
    assert is_correct(completion, reference) is False


def test_math_reads_the_reference_boxed_or_bare():
    assert is_correct(r"\boxed{\frac{1}{2}}", r"so \boxed{0.5}") and is_correct(r"\boxed{\frac{1}{2}}", "0.5")
    # several boxes are one answer, as math-verify reads them (its boxed="all", as lighteval's and open-r1's)
    two = r"first \boxed{1}, then \boxed{\frac{3}{4}}"
    assert extract_answer(two) == r"1,\frac{3}{4}" and is_correct(two, r"1, \frac34") and not is_correct(two, "0.75")
    assert is_correct(r"x = \boxed{2} or \boxed{-2}", r"\pm 2")
    assert extract_answer("nothing to read") is None


@pytest.mark.parametrize(
    "text,letter",
    [
        (r"so \boxed{C}", "C"),
        (r"\boxed{(B)}", "B"),
        (r"\boxed{\text{D}}", "D"),
        (r"\boxed{A. 12 m/s}", "A"),
        ("Thus the answer is (D).", "D"),
        ("Answer: **B**", "B"),
        ("The correct option is C", "C"),
        ("first the answer is A, then the answer is B", "B"),
        ("the answer is Avocado", None),
        ("no letter here", None),
    ],
)
def test_choice_extracts_the_letter(text, letter):
    assert extract_choice(text) == letter
    assert extract_answer(text, "choice") == letter


def test_choice_grades_the_letter():
    assert is_correct(r"so \boxed{C}", "C", "choice") and not is_correct(r"so \boxed{B}", "C", "choice")
    assert not is_correct("no letter", "C", "choice")


def test_text_after_the_thought_is_graded():
    thinking = r"<think>maybe \boxed{3}? no.</think> The answer is \boxed{4}."
    assert is_correct(thinking, "4") and not is_correct(thinking, "3")
    assert answer_part(thinking) == r" The answer is \boxed{4}."
    # cut off inside its thought: no answer, whatever the thought held
    assert not is_correct(r"<think>so \boxed{4}", "4") and answer_part(r"<think>so \boxed{4}") is None
    assert extract_answer(r"<think>so \boxed{4}") is None
    # a prompt that opened the thought: the completion holds only its end
    fmt = get_answer_format("math")
    assert fmt.grade(r"so \boxed{4}", "4", thought_open=True) == (None, False)
    assert fmt.grade(r"hmm</think>\boxed{4}", "4", thought_open=True) == ("4", True)
    assert answer_part(r"plain \boxed{4}") == r"plain \boxed{4}"


def test_grading_off_the_main_thread():
    """math-verify's alarms work only in the main thread: from another, a worker process grades."""
    verdicts = []

    def grade():
        verdicts.append((is_correct(r"\boxed{0.5}", r"\frac12"), is_correct(r"\boxed{0.6}", r"\frac12")))

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join(timeout=120)
    assert verdicts == [(True, False)]


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        (r"\boxed{ \{1, 2\} }", r"\{1, 2\}"),
        (r"\fbox{7}", "7"),
        ("no box here", None),
        (r"\boxed{unclosed", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64])
def test_pass_at_k_is_the_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            closed = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 is the share correct


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(ValueError, match="0 < k ≤ n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match=r"pass@8 needs at least 8 samples a problem, but there are 4"):
        score([[True, False, False, False]], [8])


def test_scores_with_standard_errors_and_the_overall_row():
    correct = [[True, True, False, False], [False, False, False, False], [True, True, True, True]]
    s = score(correct, default_ks(4), answered=[[True] * 4, [True, False, True, False], [True] * 4],
              finished=[[True] * 4, [False] * 4, [True] * 4], tokens=[[10] * 4, [20] * 4, [30] * 4])  # fmt: skip
    assert default_ks(4) == [1, 2, 4] and default_ks(1) == [1] and default_ks(6) == [1, 2, 4, 6]
    assert s.avg == pytest.approx(0.5) and s.pass_at[1][0] == pytest.approx(0.5)
    per_problem = [1 - comb(2, 2) / comb(4, 2), 0.0, 1.0]
    assert s.pass_at[2][0] == pytest.approx(sum(per_problem) / 3)
    assert s.pass_at[4][0] == pytest.approx(2 / 3)
    mean, se = mean_and_error([0.5, 0.0, 1.0])
    assert (s.avg, s.avg_se) == pytest.approx((mean, se)) and se == pytest.approx(((0.25 * 2) / 2 / 3) ** 0.5)
    assert s.answered == pytest.approx(10 / 12) and s.finished == pytest.approx(8 / 12) and s.mean_tokens == 20
    other = score([[True], [False]], [1])
    both = overall([s, other])
    assert both.avg == pytest.approx((0.5 + 0.5) / 2) and both.samples == 0 and set(both.pass_at) == {1}
    assert both.avg_se == pytest.approx((s.avg_se**2 + other.avg_se**2) ** 0.5 / 2)


class CharTokenizer:
    """One token a character, as text; a chat template that wraps the user turn."""

    chat_template = "{{ messages }}"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return f"<user>{messages[0]['content']}</user>"


def plant(monkeypatch, write, seen=None):
    """Generation writes ``write(prompt_text, seed) -> (completion, end)``; ``seen`` collects the
    (prompt, seed) pairs it was asked for."""

    def fake_rollout(student, teacher, prompts, config, seeds, tokenizer, max_rows, on_finished):
        assert student is None and config.mode == "off_policy"
        out = []
        for index, (prompt, seed) in enumerate(zip(prompts, seeds)):
            text = "".join(map(chr, prompt)) if isinstance(tokenizer, CharTokenizer) else tokenizer.decode(prompt)
            completion, end = write(text, seed)
            if seen is not None:
                seen.append((text, seed))
            out.append(Trajectory(list(prompt), tokens=[ord(c) for c in completion], finish_reason=end))
            on_finished(index, out[-1])
        return out

    monkeypatch.setattr(engine_module.api, "rollout", fake_rollout)


def test_evaluate_grades_scores_and_writes(tmp_path, monkeypatch):
    """Two problems × four samples with planted completions: avg@4 and pass@k from the verdicts."""
    from motab.synthesis import response_seed

    sample_of = {response_seed(0, f"benchmark/{i}", k): (i, k) for i in range(2) for k in range(4)}
    texts = {0: [r"\boxed{0.75}", r"\boxed{5}", "<think>x", r"\boxed{3/4}"], 1: [r"\boxed{7}"] * 4}

    def write(prompt, seed):
        i, k = sample_of[seed]
        return texts[i][k], "length" if texts[i][k] == "<think>x" else "eos"

    plant(monkeypatch, write)
    tokenizer = CharTokenizer()
    result = evaluate("model", tokenizer, [[0], [1]], ["3/4", "7"], samples=4, out_dir=tmp_path)
    assert [p["correct"] for p in result.per_problem] == [[True, False, False, True], [True] * 4]
    assert result.per_problem[0]["extracted"][2] is None and result.per_problem[0]["end"][2] == "length"
    assert result.accuracy == pytest.approx(0.75) and set(result.pass_at_k) == {1, 2, 4}
    assert result.pass_at_k[2] == pytest.approx((1 - comb(2, 2) / comb(4, 2) + 1) / 2)
    assert result.score.finished == pytest.approx(7 / 8) and result.score.answered == pytest.approx(7 / 8)
    lines = (tmp_path / "benchmark.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["extracted"] == ["7"] * 4
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["benchmarks"]["benchmark"]["avg"] == pytest.approx(0.75)
    assert written["settings"]["samples"] == 4 and written["data"]["benchmark"]["answer_format"] == "math"
    assert "| benchmark | 2 | 4 | 75.0 ± 25.0 |" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="pass@8 needs at least 8 samples"):
        evaluate("model", tokenizer, [[0]], ["1"], samples=4, pass_k=[8])


@pytest.fixture
def registry(monkeypatch):
    """The formats registered in a test are forgotten after it."""
    monkeypatch.setattr(evaluate_module.formats, "_FORMATS", dict(_FORMATS))


def test_a_registered_format_grades_by_name(tmp_path, monkeypatch, registry):
    """A custom format with its own verdict: evaluate finds it by name, records what it extracts
    and counts what it grades."""
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

    texts = {"\x00": ["B so A", "A so B"], "\x01": ["C", "so C"]}
    plant(monkeypatch, lambda prompt, seed: (texts[prompt].pop(0), "eos"))
    result = evaluate("model", CharTokenizer(), [[0], [1]], ["B", "C"], samples=2, answer_format="letter")
    assert [p["extracted"] for p in result.per_problem] == [["A", "B"], ["C", "C"]]
    assert [p["correct"] for p in result.per_problem] == [[True, False], [True, False]]
    assert result.accuracy == pytest.approx(0.5)
    unregistered = AnswerFormat("first-word", extract=lambda completion: completion.split()[0])
    assert get_answer_format(unregistered) is unregistered and "first-word" not in answer_formats()
    replaced = AnswerFormat("letter", extract=str.strip)
    assert register_answer_format(replaced, replace=True) is get_answer_format("letter") is replaced


def test_an_unknown_format_is_refused_before_generation(monkeypatch):
    def no_rollout(*args, **kwargs):
        raise AssertionError("generated before checking the answer format")

    monkeypatch.setattr(engine_module.api, "rollout", no_rollout)
    with pytest.raises(ValueError, match=r"unknown answer format 'nope'; registered: 'math', 'choice'"):
        evaluate("model", CharTokenizer(), [[0]], ["1"], answer_format="nope")
    with pytest.raises(ValueError, match=r"'boxed' is now 'math'"):
        extract_answer(r"\boxed{1}", "boxed")
    with pytest.raises(TypeError, match="expected an AnswerFormat"):
        register_answer_format("toy")


def test_the_demo_registers_the_toy_format(monkeypatch):
    """``answer_format="toy"`` (``motab eval --preset toy``) grades the toy task's first ``#d``,
    as the demo grades it, once ``motab.demo`` is imported."""
    import motab.demo

    assert get_answer_format("toy") is motab.demo.TOY_ANSWER_FORMAT
    texts = {"\x00": ["c=1+2=3 #3 #4", "#4 #3"], "\x01": ["so", "#4"]}
    plant(monkeypatch, lambda prompt, seed: (texts[prompt].pop(0), "eos"))
    result = evaluate("model", CharTokenizer(), [[0], [1]], ["3", "4"], samples=2, answer_format="toy")
    assert [p["extracted"] for p in result.per_problem] == [["3", "4"], [None, "4"]]
    assert [p["correct"] for p in result.per_problem] == [[True, False], [False, True]]


def test_evaluate_imports_no_toy_module():
    """The grading core knows no task: importing it loads nothing of ``motab.toy`` and registers
    ``math`` and ``choice``; the demo, a front end, brings ``toy``."""
    code = (
        "import sys, motab.evaluate as e\n"
        "print(sorted(m for m in sys.modules if m.startswith('motab.toy')), e.answer_formats())\n"
        "import motab.demo\n"
        "print(e.answer_formats())"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["[] ('math', 'choice')", "('math', 'choice', 'toy')"]


def test_generation_path_runs_on_a_tiny_model(tmp_path):
    words = [f"w{i}" for i in range(60)]
    tokenizer = word_tokenizer(words, "w0")
    model = tiny_qwen2(0, hidden=32, layers=1, vocab=60, initializer_range=0.02).eval()
    result = evaluate(model, tokenizer, [[1, 2], [3]], ["1", "2"], samples=2, max_new_tokens=5, out_dir=tmp_path)
    assert result.accuracy == 0.0  # random words hold no answer
    assert all(len(p["completions"]) == 2 for p in result.per_problem)
    assert all(end == "length" for p in result.per_problem for end in p["end"])  # no EOS id: the limit
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
    assert "tokens/s" not in capsys.readouterr().err
