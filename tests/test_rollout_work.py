"""What one decode round asks of the device: host synchronisations, tensor operations and Triton
launches bounded and independent of the batch size, and the Triton specialisations of a rollout
whose batch composition and draft lengths vary bounded too (``motab.profiling``'s counters).

On a CPU the counters are told what would live on the GPU (the models and their caches) and the
kernels run the GPU's code paths (Triton, in the interpreter); on a GPU the same tests count the
real thing."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from motab import engine as engine_module
from motab.config import MonitorConfig, RolloutConfig, SamplingConfig
from motab.models import PagedModel
from motab.profiling import RoundWork, count_device_work
from motab_kernels import fused_linear_divergence
from tests.tiny import tiny_qwen2

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SAMPLING = SamplingConfig(temperature=1.0)
INTERVENTION_LEN = 3
BASE = RolloutConfig(
    max_new_tokens=16,
    draft_len=4,
    intervention_len=INTERVENTION_LEN,
    max_interventions=100,
    student_sampling=SAMPLING,
    teacher_sampling=SAMPLING,
    vocab_size=64,
)
# τ = 1 nat of fkl: random tiny models disagree above it often, so most rounds intervene
MODES = {
    "on_policy": replace(BASE, mode="on_policy"),
    "motab": replace(BASE, mode="motab", monitor=MonitorConfig(rule="fixed", tau=1.0, warmup=0)),
}
# Host reads a round makes: all drafts at once, then all statistics at once; an intervention adds
# one read per token the teacher writes (EOS and stop strings are found on the host).
SYNCS_PER_ROUND = {"on_policy": 2, "motab": 2 + INTERVENTION_LEN}


@pytest.fixture(autouse=True)
def gpu_code_paths(monkeypatch):
    """The fused op's Triton route, as on a GPU (on a CPU its default is the chunked PyTorch one)."""
    monkeypatch.setattr(
        engine_module.rounds, "fused_linear_divergence", functools.partial(fused_linear_divergence, impl="triton")
    )


def paged_pair(rows: int) -> list[PagedModel]:
    student, teacher = tiny_qwen2(0).to(DEVICE), tiny_qwen2(1, hidden=96).to(DEVICE)
    return [
        PagedModel(
            m.eval(), max_rows=rows, max_tokens=rows * 64, max_seq_len=80, attention_impl="triton", cache_impl="triton"
        )
        for m in (student, teacher)
    ]


def prompts(batch: int) -> list[list[int]]:
    """Prompts of 2–10 tokens, different for every row."""
    return [[1 + (i * 7 + j) % 60 for j in range(2 + (i * 3) % 9)] for i in range(batch)]


def work_per_round(batch: int, config: RolloutConfig):
    """The device work of every draft round of one rollout (its interventions included)."""
    paged = paged_pair(batch)
    with count_device_work(*paged) as count:
        work = RoundWork(count)
        trajectories = engine_module.rollout(*paged, prompts(batch), config, round_hook=work)
    return work.rounds["draft"], trajectories


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_decode_round_asks_the_same_of_the_device_at_any_batch_size(mode):
    small, _ = work_per_round(2, MODES[mode])
    large, trajectories = work_per_round(8, MODES[mode])
    if mode == "motab":
        assert sum(len(t.interventions) for t in trajectories) >= 8, "the planted boundary should make rows intervene"
    for rounds in (small, large):
        assert max(r.syncs for r in rounds) <= SYNCS_PER_ROUND[mode], [dict(r.by_sync) for r in rounds]
    # Every round's work is batched over its rows: 4× the rows, not one more operation or launch.
    for measure in ("ops", "triton_launches"):
        assert max(getattr(r, measure) for r in large) == max(getattr(r, measure) for r in small), measure
    assert max(r.triton_launches for r in large) > 0


def test_varying_batches_and_drafts_compile_a_bounded_set_of_kernels():
    """Rollouts of other batch sizes, prompt lengths and draft lengths reuse the kernels the first
    two compiled: the specialisations depend on the models' shapes, not on the batch."""
    paged = paged_pair(8)
    seen, added = set(), []
    for batch, draft_len in ((1, 2), (3, 5), (7, 3), (5, 4), (8, 6)):
        config = replace(MODES["motab"], draft_len=draft_len, max_new_tokens=12)
        with count_device_work(*paged) as count:
            engine_module.rollout(*paged, prompts(batch), config)
        added.append(len(count.specialisations - seen))
        seen |= count.specialisations
    assert added[2:] == [0, 0, 0], added
    kernels = {name for name, _ in seen}
    assert {"_move_blocks_kernel", "divergence_rows_kernel"} <= kernels
    assert any("attention" in name for name in kernels)
    assert len(seen) <= 12, sorted(seen)
