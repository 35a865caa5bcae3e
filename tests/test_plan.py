"""Plan before load (``motab.engine.plan``, ``--plan``): at the paper's shapes (Qwen3-32B teacher,
Qwen3-4B student, 32,768-token trajectories) the KV bytes a token, the weights, the pool a GPU
leaves and the rows in flight match the arithmetic done by hand; the CLI prints it without
loading a weight."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3Config

from motab.cli import main
from motab.config import RolloutConfig
from motab.engine.plan import GIB, model_plan, plan
from motab.engine.schedule import tokens_per_row

# The published config.json of each model (the fields that size it).
QWEN3_32B = dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)  # fmt: skip
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)  # fmt: skip
PAPER = RolloutConfig(mode="step_motab", max_new_tokens=32768)


@pytest.fixture(scope="module")
def paper_models():
    return [
        model_plan("teacher", "Qwen/Qwen3-32B", Qwen3Config(**QWEN3_32B), torch.bfloat16),
        model_plan("student", "Qwen/Qwen3-4B", Qwen3Config(**QWEN3_4B), torch.bfloat16),
    ]


def test_the_paper_models_kv_a_token_and_weights(paper_models):
    teacher, student = paper_models
    assert teacher.kv_bytes_per_token == 64 * 8 * 128 * 2 * 2 == 256 * 1024  # layers × KV heads × head × K,V × bf16
    assert student.kv_bytes_per_token == 36 * 8 * 128 * 2 * 2 == 144 * 1024
    # Qwen's model cards: 32.8 B and 4.0 B parameters
    assert teacher.parameters == pytest.approx(32.8e9, rel=0.01)
    assert student.parameters == pytest.approx(4.02e9, rel=0.01)
    assert teacher.weight_bytes == 2 * teacher.parameters
    assert (teacher.weight_bytes + student.weight_bytes) / 1e9 == pytest.approx(73.6, abs=0.5)  # the issue's ≈ 72 GB


def test_an_h200_at_the_paper_shapes_holds_rows_by_the_arithmetic(paper_models):
    memory = 141 * 10**9  # an H200's 141 GB
    rows = 32
    result = plan(paper_models, PAPER, prompt_tokens=512, rows=rows, device="H200", memory_bytes=memory)
    left = memory - sum(m.weight_bytes for m in paper_models)
    assert left / 1e9 == pytest.approx(67.4, abs=0.5)
    want = int(left * PAPER.kv_memory) // ((256 + 144) * 1024)  # both pools hold the same tokens
    assert result.pool_tokens == want and 125_000 < want < 135_000
    row = tokens_per_row(512, PAPER)
    assert row == 512 + 32768 + 8 + 16 + 1 + 256 + 8  # prompt, budget, a draft, an intervention, a correction
    assert result.rows_at(row) == want // row == 3  # at the whole budget
    assert result.rows_at(512 + 8192) == min(rows, want // (512 + 8192)) == 15  # traces of 8k tokens
    # the teacher alone (teacher_steps), as the issue counted it: its KV only
    alone = plan(paper_models[:1], PAPER, prompt_tokens=512, rows=rows, device="H200", memory_bytes=memory)
    assert alone.pool_tokens == int((memory - paper_models[0].weight_bytes) * PAPER.kv_memory) // (256 * 1024)
    text = result.table(512, PAPER.max_new_tokens)
    assert f"{want:,} tokens in each model's pool" in text and "32.76 B" in text and "256 KiB" in text


def test_weights_larger_than_the_gpu_are_refused(paper_models):
    with pytest.raises(ValueError, match="do not fit the device's 40.0 GiB"):
        plan(paper_models, PAPER, prompt_tokens=512, rows=8, device="A100", memory_bytes=40 * GIB)


def test_kv_tokens_sets_the_pool_and_a_cpu_takes_every_rows_budget(paper_models):
    set_pool = plan(
        paper_models, RolloutConfig(kv_tokens=50_000), prompt_tokens=100, rows=4, device="x", memory_bytes=None
    )
    assert set_pool.pool_tokens == 50_000
    cpu = plan(paper_models, RolloutConfig(), prompt_tokens=100, rows=4, device="cpu", memory_bytes=None)
    assert cpu.pool_tokens == 4 * (tokens_per_row(100, RolloutConfig()) + RolloutConfig().block_size)
    assert cpu.rows_at(tokens_per_row(100, RolloutConfig())) == 4


def test_plan_on_the_command_line_loads_no_weight(tmp_path, monkeypatch, capsys):
    """``--plan 141`` reads config.json (and the tokenizer for the prompts' lengths), prints the
    plan and exits; a weight load would fail here."""
    from tests.tiny import stop_tokenizer, tiny_qwen2

    tokenizer = stop_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        tiny_qwen2(seed, vocab=len(tokenizer)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in ("ab = 3", "x")))

    def no_weights(*args, **kwargs):
        raise AssertionError("--plan loaded a model")

    monkeypatch.setattr("motab.cli.load_model", no_weights)
    common = ["--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--data", str(data)]
    assert main(["synthesize", *common, "--out", str(tmp_path / "r.jsonl"), "--plan", "141", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "plan for a GPU of 141 GiB, bfloat16" in out and "rows in flight (the run's cap: 8)" in out
    assert not (tmp_path / "r.jsonl").exists()
    assert main(["synthesize", *common, "--out", str(tmp_path / "r.jsonl"), "--plan", "--kv-tokens", "4096"]) == 0
    assert "4,096 tokens in each model's pool (--kv-tokens" in capsys.readouterr().out


def test_the_readme_shows_the_plan_at_the_paper_shapes(paper_models):
    """The README's --plan output for one H200 is what ``plan`` prints (prompts of 512 tokens)."""
    from pathlib import Path

    memory = int(131.3 * GIB)
    text = plan(paper_models, PAPER, prompt_tokens=512, rows=32, device="a GPU of 131.3 GiB, bfloat16",
                memory_bytes=memory).table(512, PAPER.max_new_tokens)  # fmt: skip
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "\n".join("  " + line for line in text.splitlines()) in readme
