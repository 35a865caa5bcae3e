"""The benchmarks of the paper's protocol, read from local files in their usual Hugging Face
layouts (JSONL, Parquet or a saved ``datasets`` folder; nothing is downloaded), and any other file
of problems with answers.

Each named benchmark knows its fields (the first of each list that the records have), its answer
format and the samples a problem the authors' protocol draws (``PAPER_SAMPLES``):

- ``math500``  (HuggingFaceH4/MATH-500): ``problem``, ``answer``, ``unique_id``; math; 1 sample.
- ``aime24``   (HuggingFaceH4/aime_2024, Maxwell-Jia/AIME_2024, math-ai/aime24): ``problem`` /
  ``Problem`` / ``question``, ``answer`` / ``Answer``, ``id`` / ``ID``; math; 4.
- ``aime25``   (math-ai/aime25, yentinglin/aime_2025, opencompass/AIME2025): as aime24; math; 4.
- ``amc23``    (math-ai/amc23, zwhe99/amc23, AI-MO/aimo-validation-amc): as aime24; math; 4.
- ``gpqa_diamond`` (Idavidrein/gpqa, gpqa_diamond): ``Question``, ``Correct Answer`` and
  ``Incorrect Answer 1``–``3``; choice; 4. The four options are shuffled per problem with a fixed
  seed (as lighteval does, so the gold letter is not always A), and the question lists them as
  ``A) …`` to ``D) …``; the reference is the gold option's letter.

A file given without a name is a custom benchmark named by its file name: its fields come from the
field map (``--field-map``; ``auto`` recognises LIMO's and AceReason's) and its format from
``--answer-format``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from motab.config import FieldMap
from motab.data import load_records, resolve_field_map

# The samples a problem the authors' evaluation draws (EvalScope, RESEARCH.md): 4, and 1 on MATH-500.
PAPER_SAMPLES = {"math500": 1, "aime24": 4, "aime25": 4, "amc23": 4, "gpqa_diamond": 4}
# lighteval seeds its GPQA shuffle with one fixed number; ours hashes it with the question, so a
# problem's order does not depend on the file's order or on --limit.
CHOICE_SHUFFLE_SEED = 42
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a named benchmark's records keep the question, the answer and an id (the first of each
    tuple that the records have), and how it is graded. A choice benchmark lists the gold option's
    field and the other options' fields instead of an answer field."""

    name: str
    answer_format: str
    prompt: tuple[str, ...]
    answer: tuple[str, ...] = ()
    ids: tuple[str, ...] = ("id", "ID", "unique_id", "Record ID")
    gold_option: str | None = None
    other_options: tuple[str, ...] = ()


_QUESTION = ("problem", "Problem", "question", "Question")
_ANSWER = ("answer", "Answer")
BENCHMARKS = {
    "math500": BenchmarkSpec("math500", "math", ("problem",), _ANSWER, ("unique_id", "id")),
    "aime24": BenchmarkSpec("aime24", "math", _QUESTION, _ANSWER),
    "aime25": BenchmarkSpec("aime25", "math", _QUESTION, _ANSWER),
    "amc23": BenchmarkSpec("amc23", "math", _QUESTION, _ANSWER),
    "gpqa_diamond": BenchmarkSpec(
        "gpqa_diamond",
        "choice",
        ("Question",),
        gold_option="Correct Answer",
        other_options=("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
        ids=("Record ID", "id"),
    ),
}


@dataclass(frozen=True)
class Problem:
    """One problem of a benchmark: its id, the question as the model reads it (a choice question with
    its lettered options) and the reference answer (a choice: the gold letter)."""

    id: str
    question: str
    reference: str


@dataclass
class Benchmark:
    """A benchmark's problems, read from ``path``, and its answer format's name."""

    name: str
    path: str
    answer_format: str
    problems: list[Problem]


def load_benchmark(
    name: str | None,
    path: str | Path,
    *,
    field_map: str | FieldMap = "auto",
    answer_format: str = "math",
    limit: int | None = None,
) -> Benchmark:
    """The problems of benchmark ``name`` (one of ``BENCHMARKS``) from ``path``; ``name`` None: a
    custom benchmark named by the file, its fields from ``field_map``, graded in ``answer_format``.
    A file without the benchmark's fields, or with an id twice, is refused (ValueError)."""
    records = load_records(path)
    records = records[:limit] if limit else records
    if name is None:
        label = Path(path).name.split(".")[0] or "benchmark"
        try:
            fields = resolve_field_map(records[0], field_map)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        if fields.answer is None:
            raise ValueError(f"{path}: the field map names no answer field, and eval grades against one")
        problems = [_plain_problem(r, i, fields.prompt, fields.answer, ("id",), path) for i, r in enumerate(records)]
        return Benchmark(label, str(path), answer_format, _unique(problems, path))
    spec = BENCHMARKS.get(name)
    if spec is None:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (or give a bare path)")
    if spec.gold_option is not None:
        problems = [_choice_problem(spec, r, i, path) for i, r in enumerate(records)]
    else:
        prompt = _field(spec.prompt, records[0], name, "question", path)
        answer = _field(spec.answer, records[0], name, "answer", path)
        problems = [_plain_problem(r, i, prompt, answer, spec.ids, path) for i, r in enumerate(records)]
    return Benchmark(name, str(path), spec.answer_format, _unique(problems, path))


def _field(candidates: tuple[str, ...], record: dict, name: str, what: str, path) -> str:
    found = next((c for c in candidates if c in record), None)
    if found is None:
        raise ValueError(
            f"{path} is not laid out as {name}: its records have no {what} field ({' or '.join(candidates)}); "
            f"they have {sorted(record)}"
        )
    return found


def _record_id(record: dict, ids: tuple[str, ...], number: int) -> str:
    return str(next((record[f] for f in ids if record.get(f) is not None), number))


def _plain_problem(record: dict, number: int, prompt: str, answer: str, ids: tuple[str, ...], path) -> Problem:
    for needed in (prompt, answer):
        if record.get(needed) is None:
            raise ValueError(f"record {number} of {path} has no {needed!r} (it has {sorted(record)})")
    return Problem(_record_id(record, ids, number), str(record[prompt]), _as_text(record[answer]))


def _as_text(answer) -> str:
    """A reference as text (AMC files store 27 as 27.0; math-verify equates them anyway)."""
    return str(answer).strip()


def _choice_problem(spec: BenchmarkSpec, record: dict, number: int, path) -> Problem:
    for needed in (spec.prompt[0], spec.gold_option, *spec.other_options):
        if record.get(needed) is None:
            raise ValueError(
                f"record {number} of {path} is not laid out as {spec.name}: it has no {needed!r} "
                f"(it has {sorted(record)})"
            )
    question = str(record[spec.prompt[0]]).strip()
    gold = str(record[spec.gold_option]).strip()
    options = [gold, *(str(record[f]).strip() for f in spec.other_options)]
    random.Random(f"{CHOICE_SHUFFLE_SEED}:{question}").shuffle(options)
    listed = "\n".join(f"{LETTERS[i]}) {option}" for i, option in enumerate(options))
    return Problem(_record_id(record, spec.ids, number), f"{question}\n\n{listed}", LETTERS[options.index(gold)])


def _unique(problems: list[Problem], path) -> list[Problem]:
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise ValueError(f"{path}: the id {problem.id!r} appears twice; samples are keyed by (id, sample)")
        seen.add(problem.id)
    return problems


def parse_data_sources(items: str | list[str] | dict) -> list[tuple[str | None, str]]:
    """``--data`` (or the YAML's ``data``) as (benchmark name or None, path) pairs: a bare path is a
    custom benchmark; ``NAME=PATH`` (or a mapping) names a known one."""
    if isinstance(items, dict):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        pairs = []
        for item in [items] if isinstance(items, str) else list(items):
            name, equals, path = str(item).partition("=")
            named = bool(equals) and name in BENCHMARKS or (equals and not Path(item).exists())
            pairs.append((name, path) if named else (None, str(item)))
    for name, path in pairs:
        if name is not None and name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (or give a bare path)")
        if not (isinstance(path, str) and path):
            raise ValueError(f"benchmark {name}: its data is a path, got {path!r}")
    names = [name for name, _ in pairs if name is not None]
    if len(names) != len(set(names)):
        raise ValueError(f"a benchmark is named twice in the data: {names}")
    if len(pairs) > 1 and any(name is None for name, _ in pairs):
        raise ValueError("with several data files, name each: --data math500=PATH aime24=PATH ...")
    return pairs
