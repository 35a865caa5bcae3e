"""The paper's data synthesis: step-level rollouts of every question, turned into SFT records.

For each question and each of ``responses`` samples, the engine runs a step mode
(``step_motab`` by default; ``step_skd`` and ``teacher_steps`` are the reference scripts'
baselines) and the trajectory becomes one JSON record:

- ``output``, the training text. ``step_motab`` with a breach: *asymmetric stitching* — every
  student step written (the flawed ones too), the marker, then the teacher's correction from the
  root-cause step; with ``trim_stop`` exactly as the scripts join them (steps joined by "\\n\\n",
  then "\\n\\n" + marker + "\\n\\n" + correction), by default the steps as written (each already
  ending in its stop string), then marker + "\\n\\n" + correction. Without a breach, and in the
  baselines, the steps that stand in the final text, joined the same way.
- ``prompt`` and ``completion``: the same text in TRL's prompt–completion form (``motab sft``);
  ``input`` (the question) and ``output`` load as-is in LLaMA-Factory.
- ``id`` (the input's ``id``, else the question's 0-based index in the file), ``response_index``,
  ``breach``, ``root_cause`` (t* or null), ``correction`` (text or null), ``steps``
  (``{"text", "oracle_value", "boundary", "entropy"}`` in order, with ``writer`` and ``kept``),
  ``finish_reason`` and ``tokens`` (response tokens).

Each (id, response_index) samples with its own seed, so a record does not depend on which other
rows are in flight or on the number of ranks. Rows run continuously batched (at most
``batch_size`` in flight, the next entering as one finishes) and each record goes to a per-rank
part file beside the output (``X.jsonl.parts/``) as its row finishes; a rerun with ``resume`` skips
every (id, response_index) already written (refusing different settings), and the output is the
parts merged in question order, written atomically at the end, the parts then removed. Beside the
output, ``X.jsonl.run.json`` records what produced it (motab's version, the command, the settings,
the models and data).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from motab.config import RolloutConfig, SynthesisOptions
from motab.data import load_records, resolve_field_map
from motab.engine import rollout
from motab.policy import STEP_MODES, resolve
from motab.runs import API_FLAGS, PartsOutput, RowProgress, append_line
from motab.steps import SCRIPT_SEPARATOR

# SynthesisOptions is frozen: one shared default is safe.
DEFAULT_OPTIONS = SynthesisOptions()


@dataclass(frozen=True)
class Question:
    id: str | int
    text: str


def load_questions(path: str | Path, field_map: str = "auto", limit: int | None = None) -> list[Question]:
    """Questions of a JSONL / Parquet / ``datasets`` source: LIMO's ``question``, AceReason's
    ``problem`` or the scripts' ``input`` field; each keeps the record's ``id`` when it has one,
    else its 0-based index in the file."""
    records = load_records(path)
    fields = resolve_field_map(records[0], field_map)
    questions = []
    for number, record in enumerate(records[:limit] if limit else records):
        if fields.prompt not in record:
            raise ValueError(f"record {number} of {path} lacks {fields.prompt!r} (it has {sorted(record)})")
        questions.append(Question(record.get("id", number), str(record[fields.prompt])))
    try:
        return as_questions(questions)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def prompt_text(tokenizer, question: str, prompt_format: str) -> str:
    """What the models read before the first step: the bare question, or the chat template's user
    turn and generation prompt."""
    if prompt_format == "raw":
        return question
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def response_seed(seed: int, question_id, response_index: int) -> int:
    """The sampling seed of one (question, response): a hash, so that it depends on nothing else."""
    digest = hashlib.sha256(json.dumps([seed, str(question_id), response_index]).encode()).digest()
    return int.from_bytes(digest[:4], "little")  # 32 bits: the engine mixes seeds in int64 arithmetic


def stitch(steps: Sequence[str], correction: str | None, marker: str, trim_stop: bool) -> str:
    """The training text: the steps, then (after a breach) the marker and the correction."""
    if trim_stop:
        text = SCRIPT_SEPARATOR.join(steps)
        if correction is not None:
            text += SCRIPT_SEPARATOR + marker + SCRIPT_SEPARATOR + correction
        return text
    text = "".join(steps)
    if correction is not None:
        text += marker + SCRIPT_SEPARATOR + correction
    return text


def record_of(question: Question, index: int, prompt: str, trajectory, tokenizer, config, marker: str) -> dict:
    """One JSON record of a step-mode trajectory (see the module docstring)."""

    def text(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=True)

    breach = trajectory.root_cause is not None
    steps = [
        dict(
            text=text(s["tokens"]),
            oracle_value=s["oracle_value"],
            boundary=s["boundary"],
            entropy=s["entropy"],
            writer=s["writer"],
            kept=s["kept"],
        )
        for s in trajectory.steps
    ]
    correction = None
    if breach:
        start, end = trajectory.interventions[-1]
        correction = text(trajectory.tokens[start:end])
        written = [s["text"] for s in steps]  # every student step, the flawed ones too
    else:
        written = [s["text"] for s in steps if s["kept"]]
    output = stitch(written, correction, marker, config.trim_stop)
    return {
        "id": question.id,
        "response_index": index,
        "input": question.text,
        "output": output,
        "prompt": prompt,
        "completion": output,
        "breach": breach,
        "root_cause": trajectory.root_cause,
        "correction": correction,
        "steps": steps,
        "finish_reason": trajectory.finish_reason,
        "tokens": len(trajectory.tokens),
    }


@dataclass
class SynthesisSummary:
    records: int  # written by this call on this rank
    skipped: int  # this rank's share already there (resume)
    breaches: int
    tokens: int
    seconds: float
    total: int = 0  # records in the output, all calls (rank 0; 0 on the others)
    total_breaches: int = 0  # of those, with a breach


def synthesize(
    student,
    teacher,
    tokenizer,
    questions: Sequence[Question],
    out: str | Path,
    config: RolloutConfig,
    options: SynthesisOptions = DEFAULT_OPTIONS,
    *,
    resume: bool = False,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
    provenance: dict | None = None,
    flags: tuple[str, str] = API_FLAGS,
) -> SynthesisSummary:
    """Synthesises ``options.responses`` records per question into ``out`` (JSONL). ``questions``
    are ``Question``s (an id and a text) or plain strings (their ids are their indices). Under
    several ranks each takes every ``world_size``-th row, writes its own part file, and rank 0
    merges after ``barrier``. Refuses an existing output or parts without ``resume`` (continue) or
    ``overwrite`` (remove them first), and a resume with other settings. ``out``'s ``.run.json``
    records what produced it: motab's version, the command, the settings and ``provenance`` (the
    models and data, as the caller names them; compared on resume). ``flags``: how refusals name
    resume and overwrite (the command passes its flags)."""
    questions = as_questions(questions)
    config, policy = resolve(config, tokenizer)
    if not policy.in_steps:
        raise ValueError(f"synthesis runs a step mode ({', '.join(STEP_MODES)}), not {config.mode!r}")
    output = PartsOutput(out, flags)
    # every prompt is built before anything is written: a question the template refuses leaves no trace
    prompts = {q.id: prompt_text(tokenizer, q.text, options.prompt_format) for q in questions}
    ids = {
        key: tokenizer(text, add_special_tokens=options.prompt_format == "raw")["input_ids"]
        for key, text in prompts.items()
    }
    settings = _settings(config, options, len(questions)) | ({"provenance": provenance} if provenance else {})
    if rank == 0:
        output.prepare(settings, resume, overwrite)
    if barrier is not None:
        barrier()
    done = {_key(r) for r in output.records()}
    rows = [(q, i) for q in questions for i in range(options.responses)]
    share = [row for n, row in enumerate(rows) if n % world_size == rank]
    todo = [row for row in share if (str(row[0].id), row[1]) not in done]
    written = breaches = tokens = 0
    started = time.perf_counter()
    with RowProgress(len(todo), "synthesize", progress and rank == 0) as bar:  # closed on an interrupt too
        if todo:
            with output.appending(rank) as sink:

                def write(index: int, trajectory) -> None:
                    """A row's record, on disk as soon as the row finishes (a kill loses only rows in flight)."""
                    nonlocal written, breaches, tokens
                    question, response = todo[index]
                    record = record_of(
                        question, response, prompts[question.id], trajectory, tokenizer, config, options.marker
                    )
                    append_line(sink, record)
                    written += 1
                    breaches += record["breach"]
                    tokens += record["tokens"]
                    bar.update(1, record["tokens"], f"{breaches / written:.0%} breached")

                rollout(
                    student,
                    teacher,
                    [ids[q.id] for q, _ in todo],
                    config,
                    seeds=[response_seed(options.seed, q.id, i) for q, i in todo],
                    tokenizer=tokenizer,
                    max_rows=options.batch_size,
                    on_finished=write,
                )
    if barrier is not None:
        barrier()
    summary = SynthesisSummary(written, len(share) - len(todo), breaches, tokens, time.perf_counter() - started)
    if rank == 0:
        merged = output.merge(_key, [(str(q.id), i) for q in questions for i in range(options.responses)])
        summary.total, summary.total_breaches = len(merged), sum(bool(r["breach"]) for r in merged)
    return summary


def as_questions(questions: Sequence[Question | str]) -> list[Question]:
    """``Question``s as given; plain strings become questions whose ids are their indices."""
    if isinstance(questions, (str, bytes)):
        raise TypeError("questions is a sequence of Question or str, not one string")
    found = []
    for index, question in enumerate(questions):
        if isinstance(question, Question):
            found.append(question)
        elif isinstance(question, str):
            found.append(Question(index, question))
        else:
            raise TypeError(f"questions[{index}] is a {type(question).__name__}; expected a Question or a str")
    seen: set[str] = set()
    for question in found:
        if str(question.id) in seen:
            raise ValueError(f"the id {question.id!r} appears twice; records are keyed by (id, response_index)")
        seen.add(str(question.id))
    return found


def _key(record: dict) -> tuple[str, int]:
    return str(record["id"]), record["response_index"]


def _settings(config: RolloutConfig, options: SynthesisOptions, questions: int) -> dict:
    """What a resumed run must share with the interrupted one (the batch size and the KV pool
    change no record)."""
    kept = {k: v for k, v in asdict(options).items() if k != "batch_size"}
    rollout = {k: v for k, v in asdict(config).items() if k not in ("kv_tokens", "kv_memory")}  # memory, not records
    return {"rollout": rollout, "options": kept, "questions": questions}
