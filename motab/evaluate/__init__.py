"""Accuracy on benchmarks with checkable final answers, measured as the field measures it.

- ``formats.py``: answer formats by name: ``math`` (math-verify: the reference parsed first, then
  the completion, compared in value), ``choice`` (an option letter) and those a front end registers
  (the demo's ``toy``); what follows ``</think>`` is graded. ``is_correct(completion, reference,
  answer_format="math")`` is the one-call grader.
- ``benchmarks.py``: MATH-500, AIME24, AIME25, AMC23 and GPQA-Diamond from local files in their
  usual Hugging Face layouts (GPQA's options shuffled per problem with a fixed seed), or any file.
- ``metrics.py``: avg@n and the unbiased pass@k with standard errors, per benchmark and overall.
- ``run.py``: sampling on the paged engine or vLLM, resumable, graded into ``<benchmark>.jsonl``,
  ``results.json`` and ``results.md`` (``evaluate_benchmarks``, ``motab eval``); ``evaluate`` on
  prompts already tokenised.
"""

from motab.evaluate.benchmarks import BENCHMARKS, PAPER_SAMPLES, Benchmark, Problem, load_benchmark
from motab.evaluate.formats import (
    AnswerFormat,
    answer_formats,
    answer_part,
    extract_answer,
    extract_boxed,
    extract_choice,
    get_answer_format,
    is_correct,
    register_answer_format,
)
from motab.evaluate.metrics import Score, pass_at_k
from motab.evaluate.run import EvalReport, EvalResult, evaluate, evaluate_benchmarks, generate

__all__ = [
    "BENCHMARKS",
    "PAPER_SAMPLES",
    "AnswerFormat",
    "Benchmark",
    "EvalReport",
    "EvalResult",
    "Problem",
    "Score",
    "answer_formats",
    "answer_part",
    "evaluate",
    "evaluate_benchmarks",
    "extract_answer",
    "extract_boxed",
    "extract_choice",
    "generate",
    "get_answer_format",
    "is_correct",
    "load_benchmark",
    "pass_at_k",
    "register_answer_format",
]
