"""Decode steps replayed from graphs (``motab.graphs``): padded to a bucket of rows, fed through
static buffers, they give the hidden states and the rollouts of eager decoding. On a CPU the
"eager" backend runs the padded step as a graph would replay it (its host arrays poisoned, so a
kernel that read them would fail these tests); on a GPU the real capture must equal that bit for
bit and eager decoding token for token."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from motab.config import MonitorConfig, RolloutConfig, SamplingConfig
from motab.engine import rollout
from motab.engine import rounds as rounds_module
from motab.graphs import DecodeGraphs, default_buckets
from motab.models import PagedModel
from motab_kernels import fused_linear_divergence
from tests.tiny import tiny_qwen2

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SAMPLING = SamplingConfig(temperature=1.0)
BASE = RolloutConfig(
    max_new_tokens=14,
    draft_len=4,
    intervention_len=3,
    max_interventions=100,
    student_sampling=SAMPLING,
    teacher_sampling=SAMPLING,
    vocab_size=64,
    # rows end at different steps: the decode steps shrink through the buckets
    eos_token_ids=(3, 5, 7, 11, 13, 17, 19, 23),
)
MODES = {
    "on_policy": replace(BASE, mode="on_policy"),
    # τ = 1 nat: random tiny models disagree above it often, so the teacher decodes too
    "motab": replace(BASE, mode="motab", monitor=MonitorConfig(rule="fixed", tau=1.0, warmup=0)),
    "adaswitch": replace(BASE, mode="adaswitch", monitor=MonitorConfig(rule="fixed", tau=1.0, warmup=0)),
}
PROMPTS = [[1 + (i * 7 + j) % 60 for j in range(2 + (i * 3) % 9)] for i in range(7)]


@pytest.fixture(autouse=True)
def gpu_code_paths(monkeypatch):
    """The fused op's Triton route, as on a GPU."""
    monkeypatch.setattr(
        rounds_module, "fused_linear_divergence", functools.partial(fused_linear_divergence, impl="triton")
    )


@functools.cache
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return tiny_qwen2(0).to(DEVICE).eval(), tiny_qwen2(1, hidden=96).to(DEVICE).eval()


def paged(model, graphs: str, rows: int = 8) -> PagedModel:
    return PagedModel(
        model,
        max_rows=rows,
        max_tokens=rows * 64,
        max_seq_len=80,
        attention_impl="triton",
        cache_impl="triton",
        decode_graphs=graphs,
    )


def decode(graphs: str, dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], PagedModel]:
    """Hidden states of a prefill and decode steps whose rows shrink and grow again (a smaller step
    after a larger one in the same bucket finds real slots in its padding)."""
    model = paged(models()[0] if dtype == torch.float32 else tiny_qwen2(0).to(DEVICE, dtype).eval(), graphs, rows=6)
    model.extend(range(6), PROMPTS[:6])
    outs = []
    for step, rows in enumerate([[0, 1, 2, 3, 4, 5], [0, 2, 4], [1], [0, 1, 2, 3, 4], [5, 3]]):
        ids = torch.tensor([[(7 + r + 3 * step) % 64] for r in rows], device=DEVICE)
        outs.append(model.extend(rows, ids))
    return outs, model


def real_kv(model: PagedModel) -> list[torch.Tensor]:
    """Every layer's keys and values outside the scratch block."""
    return [pool[:-1] for pool in model.cache.key_cache + model.cache.value_cache]


def test_padded_steps_give_eager_hidden_states_and_cache():
    eager, plain = decode("off")
    padded, graphed = decode("eager")
    for a, b in zip(eager, padded):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(real_kv(plain), real_kv(graphed)):  # padding wrote nothing but the scratch slot
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert graphed.cache.lengths() == plain.cache.lengths()
    assert graphed.decode_graphs.captures == 4  # buckets 6, 4, 1 and 2, each captured once (6 used twice)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rollouts_with_padded_decode_steps_equal_eager_ones(mode):
    student, teacher = models()
    config = MODES[mode]
    runs, captures = {}, {}
    for graphs in ("off", "eager"):
        pair = [paged(m, graphs) for m in (student, teacher)]
        runs[graphs] = rollout(*pair, PROMPTS, config, seeds=list(range(len(PROMPTS))))
        captures[graphs] = [m.decode_graphs.captures for m in pair if m.decode_graphs is not None]
    assert [t.tokens for t in runs["eager"]] == [t.tokens for t in runs["off"]]
    assert [t.sources for t in runs["eager"]] == [t.sources for t in runs["off"]]
    lengths = sorted(len(t.tokens) for t in runs["off"])
    assert lengths[0] < lengths[-1], "rows should end at different steps"
    student_captures, teacher_captures = captures["eager"]
    # the decoding model's steps pass through several buckets (adaswitch: the teacher's, after the switch)
    assert (teacher_captures if mode == "adaswitch" else student_captures) >= 2
    if mode != "on_policy":
        assert any("teacher" in t.sources for t in runs["off"]), "the teacher should decode in this mode"
        assert teacher_captures >= 1


def moved_weights(model: torch.nn.Module) -> None:
    """A decoder weight in new memory and a new Parameter object, as FSDP's gathering makes them."""
    mlp = model.model.layers[0].mlp
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.detach() * 1.5)


def test_weights_in_new_memory_are_captured_anew():
    model = paged(tiny_qwen2(0).to(DEVICE).eval(), "eager", rows=2)
    model.extend([0, 1], [[1, 2], [3]])
    model.extend([0, 1], torch.tensor([[4], [5]], device=DEVICE))
    assert model.decode_graphs.captures == 1
    moved_weights(model.model)
    model.extend([0, 1], torch.tensor([[6], [7]], device=DEVICE))
    assert model.decode_graphs.captures == 2


def test_steps_the_buckets_do_not_cover_run_eagerly():
    model = paged(models()[0], "eager", rows=4)
    model.decode_graphs.buckets = [1, 2]
    model.extend(range(4), [[1], [2], [3], [4]])  # a prefill of one token a row is a decode step too
    assert model.decode_graphs.captures == 0
    model.extend([0, 1], torch.tensor([[4], [5]], device=DEVICE))
    assert model.decode_graphs.captures == 1


def test_default_buckets_pad_at_most_to_twice_the_rows():
    assert default_buckets(1) == [1]
    assert default_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert default_buckets(64) == [1, 2, 4, 8, 16, 32, 64]


def test_what_graphs_cannot_run_is_refused():
    student = models()[0]
    dynamic = tiny_qwen2(0, rope_scaling={"rope_type": "dynamic", "factor": 2.0}).to(DEVICE).eval()
    with pytest.raises(ValueError, match="cannot capture 'dynamic' RoPE"):
        paged(dynamic, "eager")
    with pytest.raises(ValueError, match="unknown decode_graphs 'on'"):
        paged(student, "on")
    with pytest.raises(ValueError, match="need the Triton attention"):
        PagedModel(student, max_rows=2, max_tokens=64, attention_impl="torch", decode_graphs="eager")
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device, not cpu"):
            paged(student, "cuda")
        with pytest.raises(ValueError, match="unknown decode graph backend"):
            DecodeGraphs(paged(student, "off"), "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_graphs_equal_the_padded_step_bit_for_bit_and_eager_decoding(dtype):
    padded, _ = decode("eager", dtype)
    captured, model = decode("cuda", dtype)
    eager, _ = decode("off", dtype)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b, c in zip(padded, captured, eager):
        assert torch.equal(b, a)
        torch.testing.assert_close(b, c, **tolerance)
    assert model.decode_graphs.captures == 4


@pytest.mark.gpu
def test_a_captured_graph_reads_the_weights_as_they_are_now():
    """Weights changed in place (an optimizer step) are read by the next replay; weights moved to
    new memory are captured anew. Both equal eager decoding."""
    outs = {}
    for graphs in ("off", "cuda"):
        model = paged(tiny_qwen2(0).to(DEVICE).eval(), graphs, rows=2)
        model.extend([0, 1], [[1, 2], [3]])
        steps = [model.extend([0, 1], torch.tensor([[4], [5]], device=DEVICE))]
        with torch.no_grad():
            model.model.model.layers[0].mlp.up_proj.weight.mul_(-1.0)
        steps.append(model.extend([0, 1], torch.tensor([[6], [7]], device=DEVICE)))
        moved_weights(model.model)
        steps.append(model.extend([0, 1], torch.tensor([[8], [9]], device=DEVICE)))
        outs[graphs] = steps
    for a, b in zip(outs["off"], outs["cuda"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", sorted(MODES))
def test_rollouts_from_captured_graphs_equal_eager_ones(mode):
    student, teacher = models()
    runs = {}
    for graphs in ("off", "eager", "cuda"):
        pair = [paged(m, graphs) for m in (student, teacher)]
        runs[graphs] = [t.tokens for t in rollout(*pair, PROMPTS, MODES[mode], seeds=list(range(len(PROMPTS))))]
    assert runs["cuda"] == runs["eager"]
    assert runs["cuda"] == runs["off"]


def test_a_step_with_as_many_tokens_as_rows_but_not_one_each_runs_eagerly():
    """Rows fed 0 and 2 tokens hold as many tokens as rows: not a decode step."""
    eager, padded = (paged(models()[0], graphs, rows=2) for graphs in ("off", "eager"))
    for model in (eager, padded):
        model.extend([0, 1], [[1, 2], [3]])
    got, expected = (model.extend([0, 1], [[], [4, 5]]) for model in (padded, eager))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert padded.decode_graphs.captures == 0 and padded.lengths() == eager.lengths() == [2, 3]
