"""Loading reasoning data sets: formats, field maps, chat templates, limits and errors."""

import json

import pytest

from motab.data import FieldMap, load_problems, load_records
from tests.tiny import word_tokenizer

WORDS = ["<unk>", "what", "is", "2+2", "?", "say", "hi", "user:", "assistant:"]


def tokenizer(chat=False):
    tok = word_tokenizer(WORDS, "<unk>")
    if chat:
        tok.chat_template = "{% for m in messages %}user: {{ m['content'] }} {% endfor %}assistant:"
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LIMO = [
    {"question": "what is 2+2 ?", "solution": "...", "answer": "4"},
    {"question": "say hi", "answer": "hi", "solution": "s"},
]
ACE = [{"problem": "what is 2+2 ?", "answer": "4"}]


def test_jsonl_limo_and_acereason_auto(tmp_path):
    problems, skipped = load_problems(write_jsonl(tmp_path / "limo.jsonl", LIMO), tokenizer())
    assert skipped == 0 and [p.answer for p in problems] == ["4", "hi"] and problems[0].solution == "..."
    assert problems[0].prompt_ids == [1, 2, 3, 4]
    problems, _ = load_problems(write_jsonl(tmp_path / "ace.jsonl", ACE), tokenizer())
    assert problems[0].solution is None and problems[0].answer == "4"


def test_parquet_and_datasets_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    pq.write_table(pa.Table.from_pylist(LIMO), tmp_path / "limo.parquet")
    assert load_records(tmp_path / "limo.parquet") == LIMO
    Dataset.from_list(ACE).save_to_disk(str(tmp_path / "ace"))
    assert load_records(tmp_path / "ace") == ACE


def test_chat_template_is_used(tmp_path):
    problems, _ = load_problems(write_jsonl(tmp_path / "ace.jsonl", ACE), tokenizer(chat=True))
    assert problems[0].prompt_ids == [7, 1, 2, 3, 4, 8]


def test_too_long_prompts_skip_or_refuse(tmp_path):
    path = write_jsonl(tmp_path / "limo.jsonl", LIMO)
    problems, skipped = load_problems(path, tokenizer(), max_prompt_tokens=3)
    assert skipped == 1 and [p.answer for p in problems] == ["hi"]
    with pytest.raises(ValueError, match="prompt of 4 tokens exceeds 3"):
        load_problems(path, tokenizer(), max_prompt_tokens=3, on_too_long="error")


def test_field_override_and_errors(tmp_path):
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"q": "say hi", "a": "hi"}])
    with pytest.raises(ValueError, match=r"cannot tell the prompt field among \['a', 'q'\]"):
        load_problems(custom, tokenizer())
    problems, _ = load_problems(custom, tokenizer(), field_map=FieldMap(prompt="q", answer="a"))
    assert problems[0].answer == "hi"
    with pytest.raises(ValueError, match="lack the field 'answer'"):
        load_problems(write_jsonl(tmp_path / "x.jsonl", [{"question": "say hi"}]), tokenizer())
    with pytest.raises(ValueError, match="holds no records"):
        load_records(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
        load_records(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="unknown data format"):
        load_records(write_jsonl(tmp_path / "x.csv", ACE))
