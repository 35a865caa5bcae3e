"""``motab.synthesis``: the records' exact format, resumption after a kill, refusal of a used or
changed output, and the same records from one rank or two (gloo)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from motab import synthesis
from motab.config import ConfigError, MonitorConfig, RolloutConfig, SamplingConfig
from motab.synthesis import Question, SynthesisOptions, load_questions, stitch, synthesize
from tests.tiny import hf_greedy, step_model, stop_tokenizer

TOKENIZER = stop_tokenizer()
TEXTS = ["ab = 3", "x + 1", "q + 7 = 9, so", "zz", "k = 2"]
QUESTIONS = [Question(f"q{i}", text) for i, text in enumerate(TEXTS)]
# a file without ids keys its records by the question's index: ints, which JSON keeps as ints
INDEXED = [Question(i, text) for i, text in enumerate(TEXTS)]
# ε0 0.02 on random tiny models: some responses breach, some do not
CONFIG = RolloutConfig(
    mode="step_motab",
    max_new_tokens=40,
    draft_len=4,
    max_step_tokens=16,
    min_correction_tokens=6,
    trim_stop=True,
    monitor=MonitorConfig(epsilon0=0.0005, theta=0.0),
    student_sampling=SamplingConfig(temperature=0.6),
    teacher_sampling=SamplingConfig(temperature=0.6),
)
OPTIONS = SynthesisOptions(responses=3, batch_size=4)


def models():
    return [step_model(seed, TOKENIZER) for seed in (0, 1)]


@pytest.fixture(scope="module")
def pair():
    return models()


@pytest.fixture(scope="module")
def references(pair, tmp_path_factory):
    """The records of one uninterrupted run of ``QUESTIONS`` ("str" ids) or ``INDEXED`` ("int"
    ids), each run once, when first asked for."""

    @functools.cache
    def of(ids):
        out = tmp_path_factory.mktemp("reference") / "records.jsonl"
        synthesize(*pair, TOKENIZER, QUESTIONS if ids == "str" else INDEXED, out, CONFIG, OPTIONS, progress=False)
        return read(out)

    return of


@pytest.fixture(scope="module")
def reference(references):
    return references("str")


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def assert_same_records(a, b):
    """Equal records: every text, token count and decision exactly; the values (V, ε, H) to float32
    rounding, which differs in the last bits with the batch a row shares (CPU matmul blocking)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        values = ("oracle_value", "boundary", "entropy")
        assert {k: v for k, v in x.items() if k != "steps"} == {k: v for k, v in y.items() if k != "steps"}
        assert [{k: v for k, v in s.items() if k not in values} for s in x["steps"]] == [
            {k: v for k, v in s.items() if k not in values} for s in y["steps"]
        ]
        for s, t in zip(x["steps"], y["steps"]):
            for key in values:
                assert (s[key] is None and t[key] is None) or s[key] == pytest.approx(t[key], rel=1e-4, abs=1e-9)


def test_stitching_is_the_scripts_format():
    steps = ["a = 1", "so b = 2"]
    assert stitch(steps, "b = 3.", "However,", trim_stop=True) == "a = 1\n\nso b = 2\n\nHowever,\n\nb = 3."
    assert stitch(steps, None, "However,", trim_stop=True) == "a = 1\n\nso b = 2"
    written = ["a = 1.\n\n", "so b = 2.\n\n"]
    assert stitch(written, "b = 3.", "<REVISE>", trim_stop=False) == "a = 1.\n\nso b = 2.\n\n<REVISE>\n\nb = 3."
    assert stitch(written, None, "However,", trim_stop=False) == "a = 1.\n\nso b = 2.\n\n"


def test_records_hold_the_stitched_text_and_every_field(reference):
    assert_well_formed(reference)


def assert_well_formed(records):
    """The records of ``QUESTIONS`` (3 responses each, ``CONFIG``'s trimmed steps): each field, the
    stitched text, a breach's t* and values; some rows breach and some do not."""
    assert [(r["id"], r["response_index"]) for r in records] == [(q.id, i) for q in QUESTIONS for i in range(3)]
    breaches = [r for r in records if r["breach"]]
    assert breaches and len(breaches) < len(records)
    for record in records:
        assert record["input"] == record["prompt"] == QUESTIONS[int(record["id"][1:])].text  # raw prompts
        assert record["completion"] == record["output"]
        texts = [s["text"] for s in record["steps"]]
        if record["breach"]:
            t = record["root_cause"]
            assert not record["steps"][-1]["kept"] and all(not s["kept"] for s in record["steps"][t:])
            assert record["output"] == "\n\n".join(texts) + "\n\nHowever,\n\n" + record["correction"]
            last = record["steps"][-1]
            assert last["oracle_value"] < last["boundary"]  # the breach
            # the steps before the breach were safe (an empty step has no value and is safe)
            assert all(s["oracle_value"] is None or s["oracle_value"] >= s["boundary"] for s in record["steps"][:-1])
        else:
            assert record["correction"] is None and record["root_cause"] is None
            assert record["output"] == "\n\n".join(texts)
        for step in record["steps"]:
            assert set(step) >= {"text", "oracle_value", "boundary", "entropy"} and ".\n\n" not in step["text"]


def records_and_trajectories(student, teacher, config, out, monkeypatch):
    """The records of a run and the trajectories the engine returned for them (one rank: the
    rows in the records' order)."""
    trajectories = []
    original = synthesis.rollout

    def keeping(*args, **kwargs):
        trajectories.extend(original(*args, **kwargs))
        return trajectories[-len(args[2]) :]

    monkeypatch.setattr(synthesis, "rollout", keeping)
    synthesize(student, teacher, TOKENIZER, QUESTIONS, out, config, OPTIONS, progress=False)
    records = read(out)
    assert len(records) == len(trajectories)
    return records, trajectories


def test_a_correction_is_the_teachers_own_continuation_of_the_rewound_context(pair, tmp_path, monkeypatch):
    """With a greedy teacher the correction is what HF ``generate`` writes from the prompt and the
    steps before t*, token for token, and the record's text is that context's steps, the marker and
    that correction."""
    config = replace(CONFIG, teacher_sampling=SamplingConfig(temperature=0.0))
    records, trajectories = records_and_trajectories(*pair, config, tmp_path / "r.jsonl", monkeypatch)
    teacher = pair[1]
    corrected = 0
    for record, traj in zip(records, trajectories):
        if not record["breach"]:
            continue
        t = record["root_cause"]
        start = traj.interventions[-1][0]
        # the rewound context: the prompt and the first t steps, each followed by the separator
        context = traj.tokens[:start]
        assert TOKENIZER.decode(context) == "".join(s["text"] + "\n\n" for s in record["steps"][:t])
        written = len(traj.tokens) - start
        teachers = hf_greedy(teacher, traj.prompt + context, written)
        assert record["correction"] == TOKENIZER.decode(teachers, skip_special_tokens=True)
        # it runs to EOS or to its budget: max(min_correction_tokens, max_new_tokens − tokens before t*)
        budget = max(config.min_correction_tokens, config.max_new_tokens - start)
        assert teachers[-1] == TOKENIZER.eos_token_id or written == budget
        assert TOKENIZER.eos_token_id not in teachers[:-1]
        steps = "\n\n".join(s["text"] for s in record["steps"])
        assert record["output"] == steps + "\n\nHowever,\n\n" + record["correction"]
        corrected += 1
    assert corrected >= 3


@pytest.mark.parametrize("mode", ["step_skd", "teacher_steps"])
def test_a_baseline_record_holds_the_final_response_and_no_rejected_step(pair, tmp_path, monkeypatch, mode):
    """step_skd and teacher_steps never breach: a record's text is the response as it stands at the
    end (steps as written, no stop string trimmed), which holds no step the teacher rejected."""
    config = replace(CONFIG, mode=mode, trim_stop=False)
    student = None if mode == "teacher_steps" else pair[0]
    records, trajectories = records_and_trajectories(student, pair[1], config, tmp_path / "r.jsonl", monkeypatch)
    rejected = kept = 0
    for record, traj in zip(records, trajectories):
        assert not record["breach"] and record["correction"] is None and record["root_cause"] is None
        assert record["output"] == TOKENIZER.decode(traj.tokens, skip_special_tokens=True)
        assert record["output"] == "".join(s["text"] for s in record["steps"] if s["kept"])
        rejected += sum(not s["kept"] for s in record["steps"])
        kept += sum(s["kept"] and s["writer"] == "student" for s in record["steps"])
    if mode == "step_skd":  # both decisions happen, so leaving a rejected step in would show
        assert rejected >= 2 and kept >= 2
    else:
        assert rejected == kept == 0


@contextlib.contextmanager
def killed_after_eight_records(monkeypatch):
    """Within the block, ``synthesize`` gets a KeyboardInterrupt (a Ctrl-C) as the row after its
    eighth record finishes: eight records are on disk, the rows in flight are lost."""
    original = synthesis.rollout

    def interrupted(*args, on_finished, **kwargs):
        written = []

        def finished(index, trajectory):
            if len(written) == 8:
                raise KeyboardInterrupt
            written.append(index)
            on_finished(index, trajectory)

        return original(*args, on_finished=finished, **kwargs)

    monkeypatch.setattr(synthesis, "rollout", interrupted)
    try:
        yield
    finally:
        monkeypatch.setattr(synthesis, "rollout", original)


@pytest.mark.parametrize("ids", ["str", "int"])
def test_a_killed_run_resumes_to_the_same_records(pair, references, ids, tmp_path, monkeypatch):
    questions, reference = (QUESTIONS if ids == "str" else INDEXED), references(ids)
    assert [r["id"] for r in reference[::3]] == [q.id for q in questions]  # the ids as the input gave them
    out = tmp_path / "records.jsonl"
    with killed_after_eight_records(monkeypatch), pytest.raises(KeyboardInterrupt):
        synthesize(*pair, TOKENIZER, questions, out, CONFIG, OPTIONS, progress=False)
    assert not out.exists()
    part = tmp_path / "records.jsonl.parts" / "part-0.jsonl"
    assert len(part.read_text().splitlines()) == 8
    with open(part, "a") as f:
        f.write('{"id": ' + json.dumps(questions[4].id) + ', "respo')  # a line cut short by the kill
    with pytest.raises(ConfigError, match=r"pass resume=True to continue that run or overwrite=True"):
        synthesize(*pair, TOKENIZER, questions, out, CONFIG, OPTIONS, progress=False)  # in the API's words
    with pytest.raises(ConfigError, match="changed: options.marker"):
        synthesize(*pair, TOKENIZER, questions, out, CONFIG, SynthesisOptions(responses=3, marker="But"), resume=True)
    summary = synthesize(*pair, TOKENIZER, questions, out, CONFIG, OPTIONS, resume=True, progress=False)
    assert summary.records == 7 and summary.skipped == 8
    # the totals count every record of the output, the earlier call's too
    assert summary.total == 15 and summary.total_breaches == sum(r["breach"] for r in reference)
    assert_same_records(read(out), reference)
    assert not (tmp_path / "records.jsonl.parts").exists()  # merged into the output, then removed
    record = json.loads((tmp_path / "records.jsonl.run.json").read_text())
    assert record["motab"] and record["settings"]["options"]["marker"] == OPTIONS.marker
    again = synthesize(*pair, TOKENIZER, questions, out, CONFIG, OPTIONS, resume=True, progress=False)
    assert again.records == 0 and again.total == 15
    assert_same_records(read(out), reference)


def test_a_small_pool_and_one_row_in_flight_write_the_same_records_and_resume_each_other(
    pair, reference, tmp_path, monkeypatch
):
    """Records depend on neither the KV pool nor the rows in flight: a pool that preempts rows,
    and a run resumed with another pool and one row at a time (both change no setting a resume
    checks)."""
    preempted = []
    original = synthesis.record_of

    def counted(question, index, prompt, trajectory, *args):
        preempted.append(trajectory.counters["preempted"])
        return original(question, index, prompt, trajectory, *args)

    monkeypatch.setattr(synthesis, "record_of", counted)
    small = replace(CONFIG, kv_tokens=120)  # two rows at their longest do not fit
    out = tmp_path / "small.jsonl"
    with killed_after_eight_records(monkeypatch), pytest.raises(KeyboardInterrupt):
        synthesize(*pair, TOKENIZER, QUESTIONS, out, small, OPTIONS, progress=False)
    one_row = SynthesisOptions(responses=3, batch_size=1)
    synthesize(*pair, TOKENIZER, QUESTIONS, out, CONFIG, one_row, resume=True, progress=False)
    assert_same_records(read(out), reference)
    assert sum(preempted[:8]) > 0 and sum(preempted[8:]) == 0


def test_progress_shows_responses_tokens_per_second_and_breaches(pair, tmp_path, capsys):
    synthesize(*pair, TOKENIZER, QUESTIONS[:2], tmp_path / "r.jsonl", CONFIG, OPTIONS, progress=True)
    shown = capsys.readouterr()
    last = shown.err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("synthesize") and "6/6" in last and "tokens/s" in last and "breached" in last
    assert "tokens/s" not in shown.out


def test_questions_keep_their_ids_or_their_index(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"input": "a"}\n{"input": "b", "id": 7}\n')
    assert load_questions(path) == [Question(0, "a"), Question(7, "b")]
    path.write_text('{"question": "a", "answer": "1", "id": 1}\n{"question": "b", "answer": "2", "id": 1}\n')
    with pytest.raises(ValueError, match="appears twice"):
        load_questions(path)


def test_questions_as_plain_strings_and_wrong_types_in_api_words(pair, references, tmp_path):
    """``synthesize(..., ["text", ...])``, as the README's prose has it: ids are the indices, the
    records those of ``Question``s with those ids; anything else is refused before a file is made."""
    out = tmp_path / "plain.jsonl"
    synthesize(*pair, TOKENIZER, TEXTS, out, CONFIG, OPTIONS, progress=False)
    assert_same_records(read(out), references("int"))  # Question(i, text) for each
    with pytest.raises(TypeError, match=r"questions\[1\] is a int; expected a Question or a str"):
        synthesize(*pair, TOKENIZER, ["a", 3], tmp_path / "bad.jsonl", CONFIG, OPTIONS, progress=False)
    with pytest.raises(TypeError, match="not one string"):
        synthesize(*pair, TOKENIZER, "one question", tmp_path / "bad.jsonl", CONFIG, OPTIONS, progress=False)
    assert not (tmp_path / "bad.jsonl.parts").exists() and not (tmp_path / "bad.jsonl").exists()


def _rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        synthesize(
            *models(), TOKENIZER, QUESTIONS, out, CONFIG, OPTIONS, rank=rank, world_size=world,
            barrier=dist.barrier, progress=False,
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_write_the_same_records_as_one(reference, tmp_path):
    out = tmp_path / "records.jsonl"
    mp.spawn(_rank, args=(2, free_port(), out), nprocs=2, join=True)
    assert_same_records(read(out), reference)
    assert not (tmp_path / "records.jsonl.parts").exists()  # rank 0 merged both ranks' parts, then removed them
