"""Accuracy on a benchmark of problems with checkable final answers, by answer format.

An answer format (``AnswerFormat``) says how a completion is read and graded: ``extract`` takes its
final answer (what ``problems.jsonl`` shows), ``is_correct`` grades the completion against the
reference (by default: the extracted answer matches it after ``normalize_answer``; a grader that
reads the whole completion, such as math-verify, gives its own). Formats are looked up by name in a
registry: ``boxed`` is built in; a front end registers its own (``register_answer_format``: the demo
registers ``toy``, the toy task's ``#d``), so this module knows no task.

``extract_boxed`` takes the last ``\\boxed{}`` (or ``\\fbox{}``) of a completion, braces balanced;
``normalize_answer`` and ``answers_match`` compare it with the reference: integers and decimals
by value (``1,000`` = ``1000`` = ``1000.0``), fractions by value (``\\frac{6}{8}`` = ``3/4`` =
``0.75``), and otherwise text after removing ``$``, spaces, ``\\text{}``, ``\\left``/``\\right``, a
leading ``x =`` and a trailing period. ``evaluate`` samples n completions per problem with the
paged engine (the model writes alone, as ``off_policy``) and reports pass@1 as the mean accuracy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from motab.backends import vllm as vllm_backend
from motab.backends.vllm import is_vllm_engine
from motab.config import RolloutConfig, SamplingConfig
from motab.engine import rollout_in_batches
from motab.policy import resolve

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
GREEDY = SamplingConfig(temperature=0.0)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces kept), or None."""
    starts = [m.end() for m in _BOX.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def normalize_answer(answer: str) -> str:
    """A canonical text for ``answer`` (see the module docstring)."""
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(left|right|displaystyle|,|;|!| )", "", s)
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    value = _as_number(s)
    if value is not None:
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return s


def answers_match(predicted: str | None, reference: str) -> bool:
    return predicted is not None and normalize_answer(predicted) == normalize_answer(reference)


@dataclass(frozen=True)
class AnswerFormat:
    """How the answers of a benchmark are read and graded.

    ``extract(completion)``: the completion's final answer, or None if it gives none (recorded in
    ``problems.jsonl``). ``is_correct(completion, reference)``: whether the completion answers the
    reference; None grades ``answers_match(extract(completion), reference)``. A grader that reads
    the whole completion (math-verify's ``verify(parse(reference), parse(completion))``) or
    compares in its own way (a multiple-choice letter) is given here; its verdict need not agree
    with the extracted answer, which is then only shown."""

    name: str
    extract: Callable[[str], str | None]
    is_correct: Callable[[str, str], bool] | None = None
    description: str = ""

    def grade(self, completion: str, reference: str) -> tuple[str | None, bool]:
        """(extracted answer, correct) of one completion."""
        extracted = self.extract(completion)
        if self.is_correct is None:
            return extracted, answers_match(extracted, reference)
        return extracted, bool(self.is_correct(completion, reference))


_FORMATS: dict[str, AnswerFormat] = {}


def register_answer_format(answer_format: AnswerFormat, *, replace: bool = False) -> AnswerFormat:
    """Makes ``answer_format`` known by its name (``evaluate(..., answer_format=name)``, ``motab eval
    --answer-format``) and returns it. Registering the same format again changes nothing; another
    format under a name already taken is refused unless ``replace``."""
    if not isinstance(answer_format, AnswerFormat):
        raise TypeError(f"expected an AnswerFormat, got {type(answer_format).__name__}")
    held = _FORMATS.get(answer_format.name)
    if held is not None and held != answer_format and not replace:
        raise ValueError(f"answer format {answer_format.name!r} is already registered (pass replace=True)")
    _FORMATS[answer_format.name] = answer_format
    return answer_format


def answer_formats() -> tuple[str, ...]:
    """The names of the registered answer formats, in order of registration."""
    return tuple(_FORMATS)


def get_answer_format(answer_format: str | AnswerFormat) -> AnswerFormat:
    """The registered format of that name (a format passed as a value is returned as it is)."""
    if isinstance(answer_format, AnswerFormat):
        return answer_format
    found = _FORMATS.get(answer_format)
    if found is None:
        known = ", ".join(repr(name) for name in _FORMATS)
        raise ValueError(
            f"unknown answer format {answer_format!r}; registered: {known} "
            "(a front end adds its own with motab.evaluate.register_answer_format)"
        )
    return found


BOXED = register_answer_format(AnswerFormat("boxed", extract_boxed, description="the last \\boxed{} of a completion"))


def extract_answer(text: str, answer_format: str | AnswerFormat = "boxed") -> str | None:
    """The final answer of a completion in a registered format (default: its last ``\\boxed{}``)."""
    return get_answer_format(answer_format).extract(text)


def _as_number(s: str) -> Fraction | None:
    """Exact value of an integer, decimal or (parenthesised) fraction, with 1,000-style commas."""
    plain = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    fraction = re.fullmatch(r"\(?([-+]?[\d.]+)\)?/\(?([-+]?[\d.]+)\)?", plain)
    try:
        if fraction:
            return Fraction(fraction.group(1)) / Fraction(fraction.group(2))
        if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", plain):
            return Fraction(plain)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    seeds: Sequence[int] | None = None,
    batch_size: int | None = None,
    kv_tokens: int = 0,
    progress: bool | None = False,
) -> list[list[int]]:
    """The token ids ``model`` writes alone after each prompt (the paged engine's ``off_policy``),
    at most ``batch_size`` rows in flight (None: as many as the pool holds), continuously batched,
    on one KV pool of ``kv_tokens`` (0: ``RolloutConfig.kv_tokens``'s default) allocated once (a
    ``vllm.LLM``: every prompt in one call, vLLM batching them itself); ``seeds[i]`` fixes prompt
    i's sampling (default: i). ``progress`` shows a bar of rows done and tokens/s on stderr (None:
    only when stderr is a terminal)."""
    config = RolloutConfig(
        mode="off_policy", max_new_tokens=max_new_tokens, teacher_sampling=sampling, kv_tokens=kv_tokens
    )
    if is_vllm_engine(model):
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        return vllm_backend.generate(model, [list(p) for p in prompts], resolve(config, tokenizer)[0], seeds)
    trajectories = rollout_in_batches(
        None, model, prompts, config, batch_size=batch_size, seeds=seeds, tokenizer=tokenizer, desc="generate",
        progress=progress,
    )  # fmt: skip
    return [t.tokens for t in trajectories]


@dataclass
class EvalResult:
    accuracy: float  # pass@1: mean over problems of the share of correct samples
    per_problem: list[dict]


def evaluate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    samples: int = 1,
    max_new_tokens: int = 512,
    sampling: SamplingConfig = GREEDY,
    batch_size: int | None = None,
    kv_tokens: int = 0,
    seed: int = 0,
    out_dir: str | Path | None = None,
    answer_format: str | AnswerFormat = "boxed",
    progress: bool | None = False,
) -> EvalResult:
    """Generates ``samples`` completions per prompt (token ids) with the paged engine and grades
    them against ``answers`` in ``answer_format`` (a registered name, or an ``AnswerFormat``; default
    the last ``\\boxed{}``; ``answer_formats()`` lists the names). With ``out_dir``: ``problems.jsonl``
    (one line per problem: completions, extracted answers, correctness) and ``summary.json``.
    ``progress``: a bar of completions written and tokens/s on stderr (None: only when stderr is a
    terminal)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if samples < 1:
        raise ValueError(f"samples must be ≥ 1, got {samples}")
    grader = get_answer_format(answer_format)  # an unknown format is refused before any generation
    jobs = [(i, k) for i in range(len(prompts)) for k in range(samples)]
    seeds = [seed + i * samples + k for i, k in jobs]
    written = generate(
        model,
        tokenizer,
        [prompts[i] for i, _ in jobs],
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seeds=seeds,
        batch_size=batch_size,
        kv_tokens=kv_tokens,
        progress=progress,
    )
    completions: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    for (i, _), tokens in zip(jobs, written):
        completions[i].append(tokenizer.decode(tokens, skip_special_tokens=True))
    per_problem = []
    for i, answer in enumerate(answers):
        graded = [grader.grade(c, answer) for c in completions[i]]
        extracted = [e for e, _ in graded]
        correct = [ok for _, ok in graded]
        per_problem.append(
            dict(
                index=i,
                answer=answer,
                completions=completions[i],
                extracted=extracted,
                correct=correct,
                accuracy=sum(correct) / len(correct),
            )
        )
    accuracy = sum(p["accuracy"] for p in per_problem) / max(len(per_problem), 1)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "problems.jsonl", "w", encoding="utf-8") as f:
            for problem in per_problem:
                f.write(json.dumps(problem) + "\n")
        summary = dict(accuracy=accuracy, problems=len(per_problem), samples=samples, max_new_tokens=max_new_tokens)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return EvalResult(accuracy, per_problem)
