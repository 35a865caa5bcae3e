"""Chains of single-digit arithmetic (mod 10) over named variables: a reasoning task with steps
and a checkable answer, small enough for a teacher of a few million parameters.

A problem defines some variables and a chain of operations, then asks for the last one::

    a=3 b=7 c=a+b d=c*a ?d

and its solution works one operation per step, steps separated by the step delimiter (a blank
line, as in the engine's default), ending in the answer after ``#``::

    c=3+7=0

    d=0*3=0

    #0

Every value is a digit (all arithmetic is mod 10). ``steps`` is the difficulty knob.

Splits are disjoint by construction: a problem's split is a fixed function of its prompt (a stable
hash puts 80 % of the problem space in train, 10 % in validation, 10 % in test), and
``generate_split`` keeps only the problems of its own split from a random stream seeded per split,
so the splits never change and no problem can ever be in two of them, whatever sizes are drawn.
Within a split problems are drawn independently: there are only 7,200 two-step problems (about 720
per evaluation split), so a large draw repeats some of them, as sampling from a distribution does.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

STEP_DELIMITER = "\n\n"
# The paper's pipeline on this task (``motab synthesize --preset toy`` and the demo): steps end at
# the delimiter (one token, so trimming it changes nothing); the vocabulary has no letters for
# "However,", so the marker is "??" ("?" never occurs in a solution); budgets sized to solutions of
# at most ~50 tokens; the scripts' sampling temperature.
PAPER_PRESET = dict(
    stop=STEP_DELIMITER, marker="??", max_new_tokens=96, max_step_tokens=24, min_correction_tokens=48, temperature=0.6
)
OPERATIONS = {"+": lambda x, y: (x + y) % 10, "-": lambda x, y: (x - y) % 10, "*": lambda x, y: (x * y) % 10}
VARIABLES = "abcdefghijkl"
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
# A problem's split: its prompt's hash bucket (of 10). Train takes 8, validation and test one each.
SPLIT_BUCKETS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}
_ANSWER = re.compile(r"#(\d)")


@dataclass(frozen=True)
class ToyProblem:
    prompt: str
    solution: str
    answer: str


def make_problem(rng: random.Random, steps: int, inputs: int = 2) -> ToyProblem:
    """One problem with ``inputs`` given digits and ``steps`` operations."""
    if not 1 <= steps <= len(VARIABLES) - inputs:
        raise ValueError(f"steps must lie in [1, {len(VARIABLES) - inputs}], got {steps}")
    values = {}
    given = []
    for name in VARIABLES[:inputs]:
        values[name] = rng.randrange(10)
        given.append(f"{name}={values[name]}")
    operations, lines = [], []
    for name in VARIABLES[inputs : inputs + steps]:
        known = list(values)
        # each step uses the latest value (a real chain) and one other variable (x−x would be trivial)
        left, right = known[-1], rng.choice(known[:-1])
        if rng.random() < 0.5:
            left, right = right, left
        symbol = rng.choice(list(OPERATIONS))
        values[name] = OPERATIONS[symbol](values[left], values[right])
        operations.append(f"{name}={left}{symbol}{right}")
        lines.append(f"{name}={values[left]}{symbol}{values[right]}={values[name]}")
    target = VARIABLES[inputs + steps - 1]
    prompt = " ".join(given + operations) + f" ?{target}\n"
    answer = str(values[target])
    return ToyProblem(prompt, STEP_DELIMITER.join(lines + [f"#{answer}"]), answer)


def split_of(prompt: str) -> str:
    """The one split a problem belongs to, from a stable hash of its prompt (not Python's ``hash``,
    which is salted per process)."""
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big") % 10
    return next(name for name, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def generate_split(split: str, count: int, steps: tuple[int, int] = (2, 5)) -> list[ToyProblem]:
    """``count`` problems of a split ("train", "validation" or "test"), always the same ones, each
    of which belongs to that split alone (``split_of``)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    rng = random.Random(SPLIT_SEEDS[split])
    problems = []
    while len(problems) < count:
        problem = make_problem(rng, rng.randint(*steps))
        if split_of(problem.prompt) == split:
            problems.append(problem)
    return problems


def extract_answer(completion: str) -> str | None:
    """The digit after the first ``#`` of a completion, or None."""
    match = _ANSWER.search(completion)
    return match.group(1) if match else None


def last_answer(completion: str) -> str | None:
    """The digit after the last ``#`` of a completion, or None (how a benchmark grader reads a
    completion that revises its answer)."""
    found = _ANSWER.findall(completion)
    return found[-1] if found else None


def is_correct(completion: str, problem: ToyProblem) -> bool:
    """Exact match of the extracted answer with the problem's."""
    return extract_answer(completion) == problem.answer


@dataclass(frozen=True)
class OperandCheck:
    """One operand a completion wrote: where, what it wrote, and the two values it could be held to."""

    position: int  # character offset of the operand's digit in the completion
    written: int
    consistent: int  # the operand's value as the completion itself wrote it earlier (or the prompt gave it)
    true: int  # its value in the problem


_LINE = re.compile(r"([a-l])=(\d)([-+*])(\d)=(\d)")


def operand_checks(problem: ToyProblem, completion: str) -> list[OperandCheck]:
    """Every operand of the completion's well-formed steps, in order, up to the first malformed one.

    After a wrong value, "consistent" (what the completion wrote) and "true" part ways: that is
    where a teacher's guidance can follow the student's context or the problem.
    """
    words = problem.prompt.split()
    true = {w[0]: int(w[2]) for w in words if re.fullmatch(r"[a-l]=\d", w)}
    written = dict(true)
    operations = {w[0]: (w[2], w[4]) for w in words if re.fullmatch(r"[a-l]=[a-l][-+*][a-l]", w)}
    for line in problem.solution.split(STEP_DELIMITER)[:-1]:
        true[line[0]] = int(line[-1])
    checks, start = [], 0
    for line in completion.split(STEP_DELIMITER):
        match = _LINE.fullmatch(line)
        if not match or match.group(1) not in operations:
            break
        for column, variable in zip((2, 4), operations[match.group(1)]):
            if variable not in written:  # the completion skipped the step that defines it
                return checks
            checks.append(OperandCheck(start + column, int(line[column]), written[variable], true[variable]))
        written[match.group(1)] = int(match.group(5))
        start += len(line) + len(STEP_DELIMITER)
    return checks
