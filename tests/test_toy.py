"""The toy task: generator, splits, grader and tokenizer."""

import collections
import random

import pytest

from motab.toy.task import (
    STEP_DELIMITER,
    ToyProblem,
    extract_answer,
    generate_split,
    is_correct,
    make_problem,
    operand_checks,
    split_of,
)
from motab.toy.tokenizer import build_tokenizer


def evaluate_prompt(prompt: str) -> dict[str, int]:
    """An independent interpreter of the prompt's definitions (mod 10)."""
    values = {}
    for statement in prompt.split("?")[0].split():
        name, expression = statement.split("=")
        if expression.isdigit():
            values[name] = int(expression)
        else:
            left, symbol, right = expression[0], expression[1], expression[2]
            x, y = values[left], values[right]
            values[name] = {"+": x + y, "-": x - y, "*": x * y}[symbol] % 10
    return values


def test_solutions_are_correct_and_stepwise():
    for problem in generate_split("validation", 200):
        target = problem.prompt.strip().split("?")[1]
        assert str(evaluate_prompt(problem.prompt)[target]) == problem.answer
        steps = problem.solution.split(STEP_DELIMITER)
        assert steps[-1] == f"#{problem.answer}" and len(steps) >= 3
        assert is_correct(problem.solution, problem)


def test_splits_are_fixed_and_the_knob_sets_the_steps():
    assert generate_split("test", 50) == generate_split("test", 50)
    assert generate_split("test", 50) != generate_split("train", 50)
    for steps in (1, 4, 7):
        problem = make_problem(random.Random(0), steps)
        assert problem.solution.count(STEP_DELIMITER) == steps
    with pytest.raises(ValueError, match="unknown split"):
        generate_split("dev", 3)
    with pytest.raises(ValueError, match="steps must lie"):
        make_problem(random.Random(0), 20)


def test_splits_are_disjoint_by_construction():
    """The splits at the sizes the teacher's training and the demo draw: no prompt in two of them,
    every problem in the split its prompt hashes to, and the problem space shared 80 / 10 / 10."""
    splits = {"train": generate_split("train", 50000), "validation": generate_split("validation", 500)}
    splits["test"] = generate_split("test", 500)
    prompts = {name: {p.prompt for p in problems} for name, problems in splits.items()}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    for name, problems in splits.items():
        assert {split_of(p.prompt) for p in problems} == {name}
    rng = random.Random(0)
    shares = collections.Counter(split_of(make_problem(rng, rng.randint(2, 5)).prompt) for _ in range(20000))
    for name, share in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        assert abs(shares[name] / 20000 - share) < 0.01, shares


def test_answers_are_varied():
    answers = {p.answer for p in generate_split("train", 300)}
    assert len(answers) == 10


def test_grader():
    problem = make_problem(random.Random(1), 2)
    assert extract_answer("c=1+2=3\n\n#7 and more") == "7"
    assert extract_answer("no answer") is None
    assert not is_correct("#" + str((int(problem.answer) + 1) % 10), problem)


def test_tokenizer_round_trip_and_delimiter_token():
    tokenizer = build_tokenizer()
    for problem in generate_split("train", 20):
        text = problem.prompt + problem.solution
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(tokenizer("=0\n\n#")["input_ids"]) == ["=", "0", "\n\n", "#"]


def test_operand_checks_follow_a_wrong_value_through_the_completion():
    problem = ToyProblem("a=3 b=9 c=a*b d=c+b e=c-d ?e\n", "c=3*9=7\n\nd=7+9=6\n\ne=7-6=1\n\n#1", "1")
    assert [(c.written, c.consistent, c.true) for c in operand_checks(problem, problem.solution)] == [
        (3, 3, 3),
        (9, 9, 9),
        (7, 7, 7),
        (9, 9, 9),
        (7, 7, 7),
        (6, 6, 6),
    ]
    # the student misreads b as 3 in the first step: c is then 9, d follows from the written c
    completion = "c=3*3=9\n\nd=9+9=8\n\ne=9-8=1\n\n#1"
    checks = operand_checks(problem, completion)
    assert [(c.written, c.consistent, c.true) for c in checks] == [
        (3, 3, 3),
        (3, 9, 9),
        (9, 9, 7),
        (9, 9, 9),
        (9, 9, 7),
        (8, 8, 6),
    ]
    assert [completion[c.position] for c in checks] == [str(c.written) for c in checks]
    # a malformed step ends the checks; so does a step whose operand was never defined
    assert len(operand_checks(problem, "c=3*9=7\n\nd=7+")) == 2
    assert operand_checks(problem, "d=7+9=6") == []
