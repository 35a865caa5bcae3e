"""Reasoning data sets from disk: JSONL, Parquet or a saved ``datasets`` directory.

Records map to a problem (the prompt), an optional reference solution and a final answer through
a ``FieldMap``. Presets cover LIMO-v2 (``question`` / ``solution`` / ``answer``), AceReason-style
files (``problem`` / ``answer``, solution optional) and the MOTAB scripts' question files (``input``);
``field_map="auto"`` picks the preset whose fields the first record has, and an explicit
``FieldMap`` overrides both (the CLI's ``--field-map prompt=FIELD,answer=FIELD`` and the YAML's
``field_map: {prompt: FIELD, answer: FIELD}``, read by ``motab.config.parse_field_map``). Prompts go
through the tokenizer's chat template when it has one (a user turn, then the generation prompt), else the
raw text. Prompts longer than ``max_prompt_tokens`` are skipped and counted (``on_too_long="skip"``,
the default) or refused (``"error"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# What a user writes for a field map is configuration; these names are re-exported for the data's users.
from motab.config import FIELD_MAP_HELP, PRESETS, FieldMap, parse_field_map  # noqa: F401


@dataclass
class Problem:
    prompt: str
    prompt_ids: list[int]
    answer: str | None
    solution: str | None


def load_records(path: str | Path) -> list[dict]:
    """All records of a ``.jsonl``/``.json`` file, a ``.parquet`` file or a ``datasets`` directory
    (``save_to_disk``); a clear error for a missing, empty or unreadable source."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data set {path} does not exist")
    if path.is_dir():
        from datasets import load_from_disk

        data = load_from_disk(str(path))
        if hasattr(data, "keys"):  # a DatasetDict: take "train" or its only split
            splits = list(data.keys())
            data = data["train"] if "train" in splits else data[splits[0]]
        records = [dict(r) for r in data]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{number} is not valid JSON ({error.msg})") from error
    else:
        raise ValueError(
            f"unknown data format {path.suffix!r} for {path}: use .jsonl, .parquet or a datasets directory"
        )
    if not records:
        raise ValueError(f"data set {path} holds no records")
    return records


def resolve_field_map(record: dict, field_map: str | FieldMap = "auto") -> FieldMap:
    """The mapping to use for records shaped like ``record``."""
    if isinstance(field_map, FieldMap):
        chosen = field_map
    elif field_map == "auto":
        chosen = next((m for m in PRESETS.values() if m.prompt in record), None)
        if chosen is None:
            raise ValueError(
                f"cannot tell the prompt field among {sorted(record)}: expected one of "
                f"{sorted(m.prompt for m in PRESETS.values())}; name the fields with a field map: {FIELD_MAP_HELP}"
            )
    elif field_map in PRESETS:
        chosen = PRESETS[field_map]
    else:
        raise ValueError(f"unknown field map {field_map!r}; expected {FIELD_MAP_HELP}")
    for name in (chosen.prompt, chosen.answer):
        if name is not None and name not in record:
            raise ValueError(f"records lack the field {name!r} (they have {sorted(record)})")
    return chosen


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a problem as the model should see it: the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def load_problems(
    path: str | Path,
    tokenizer,
    *,
    field_map: str | FieldMap = "auto",
    max_prompt_tokens: int | None = None,
    on_too_long: str = "skip",
    limit: int | None = None,
) -> tuple[list[Problem], int]:
    """Problems of a data set, tokenised; returns them and the number skipped as too long."""
    if on_too_long not in ("skip", "error"):
        raise ValueError(f"on_too_long must be 'skip' or 'error', got {on_too_long!r}")
    records = load_records(path)
    fields = resolve_field_map(records[0], field_map)
    problems, skipped = [], 0
    for number, record in enumerate(records[:limit] if limit else records):
        missing = [name for name in (fields.prompt, fields.answer) if name is not None and name not in record]
        if missing:
            raise ValueError(f"record {number} of {path} lacks {missing} (it has {sorted(record)})")
        ids = prompt_ids(tokenizer, str(record[fields.prompt]))
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            if on_too_long == "error":
                raise ValueError(f"record {number} of {path}: prompt of {len(ids)} tokens exceeds {max_prompt_tokens}")
            skipped += 1
            continue
        answer = None if fields.answer is None else str(record[fields.answer])
        solution = None if fields.solution is None or fields.solution not in record else str(record[fields.solution])
        problems.append(Problem(str(record[fields.prompt]), ids, answer, solution))
    if not problems:
        raise ValueError(f"no problem of {path} fits max_prompt_tokens={max_prompt_tokens} ({skipped} skipped)")
    return problems, skipped
