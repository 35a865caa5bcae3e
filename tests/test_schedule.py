"""Continuous batching, pages on demand and preemption by recompute (``motab.engine.schedule``):
in every mode, the trajectories under a pool forced small (rows preempted and recomputed), with a
few rows in flight and with one row at a time equal those of a run with every row in flight on a
pool that holds them all; the pages are all back after every run; a pool too small for one row is
refused in one line."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest
import torch

from motab.backends import Unbounded
from motab.config import MODES, MonitorConfig, RolloutConfig, SamplingConfig
from motab.engine import paged_for_rollouts, rollout
from motab.engine.schedule import Scheduler, tokens_per_row
from motab.policy import policy_of
from motab_kernels import OutOfBlocksError
from tests.engine_checks import check_invariant_every_round
from tests.tiny import step_model, stop_tokenizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOKENIZER = stop_tokenizer()
TEXTS = ("ab = 3", "x", "q + 7 = 9, so", "b - 2", "7 + 7 = 14 and x = 2", "a")
PROMPTS = [TOKENIZER.encode(t, add_special_tokens=False) for t in TEXTS]
SEEDS = [21, 22, 23, 24, 25, 26]
BLOCK = 8


def model(seed):
    return step_model(seed, TOKENIZER, DEVICE)


@pytest.fixture(scope="module")
def models():
    return model(0), model(1)


def config(mode: str) -> RolloutConfig:
    """Every mode with its corrections firing: a fixed token boundary the random student strays
    over, and step boundaries it breaches."""
    return RolloutConfig(
        mode=mode,
        eos_token_ids=(len(TOKENIZER) + 1,),  # no EOS is ever sampled: every row runs to its budget
        max_new_tokens=32,
        draft_len=4,
        intervention_len=6,
        max_step_tokens=16,
        min_correction_tokens=8,
        block_size=BLOCK,
        monitor=MonitorConfig(rule="fixed", tau=2.0, warmup=0, epsilon0=0.5),
        student_sampling=SamplingConfig(temperature=1.0),
        teacher_sampling=SamplingConfig(temperature=0.0),
    )


def run(models, cfg: RolloutConfig, order: list[int], *, rows: int, pool_tokens: int | None = None):
    """The rollout of the prompts in ``order`` with ``rows`` in flight on PagedModels whose pools
    hold ``pool_tokens`` (default: every row's whole budget); the trajectories by prompt, and the
    models (to look at their pools afterwards)."""
    longest = max(map(len, PROMPTS))
    paged = [paged_for_rollouts(m, rows, longest, cfg, pool_tokens) for m in models]
    student = paged[0] if policy_of(cfg.mode).needs_student else None
    out = rollout(
        student,
        paged[1],
        [PROMPTS[i] for i in order],
        cfg,
        seeds=[SEEDS[i] for i in order],
        tokenizer=TOKENIZER,
        max_rows=rows,
    )
    by_prompt = [None] * len(PROMPTS)
    for i, trajectory in zip(order, out):
        by_prompt[i] = trajectory
    return by_prompt, paged


def assert_same(got, want):
    """Texts and decisions exactly; scores, values and entropies to float32 rounding."""
    for g, w in zip(got, want):
        assert g.tokens == w.tokens and g.sources == w.sources and g.finish_reason == w.finish_reason
        assert g.interventions == w.interventions and g.root_cause == w.root_cause
        assert [d["position"] for d in g.discarded] == [d["position"] for d in w.discarded]
        for a, b in ((g.scores, w.scores), (g.boundaries, w.boundaries)):
            assert len(a) == len(b)
            assert all(
                (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-4, abs=1e-4) for x, y in zip(a, b)
            )
        assert len(g.steps) == len(w.steps)
        for s, t in zip(g.steps, w.steps):
            assert {k: s[k] for k in ("start", "tokens", "writer", "end", "kept")} == {
                k: t[k] for k in ("start", "tokens", "writer", "end", "kept")
            }
            for key in ("oracle_value", "entropy", "boundary", "student_value"):
                assert (s[key] is None) == (t[key] is None)
                if s[key] is not None:
                    assert s[key] == pytest.approx(t[key], rel=1e-4, abs=1e-4)
        g_counters = {k: v for k, v in g.counters.items() if k != "preempted"}
        assert g_counters == {k: v for k, v in w.counters.items() if k != "preempted"}


def assert_pages_back(paged):
    for pm in paged:
        assert pm.num_free_blocks == pm.cache.num_blocks
        assert pm.lengths() == [0] * pm.max_rows


# A pool that holds one row at its longest (63 tokens in the token modes, 79 in the step modes)
# and the first rounds of several, never two rows at their longest: rows in flight outgrow it.
SMALL_POOL = 80


@pytest.mark.parametrize("mode", MODES)
def test_small_pool_few_rows_and_one_row_at_a_time_write_the_unconstrained_trajectories(models, mode):
    cfg = config(mode)
    everyone = list(range(len(PROMPTS)))
    want, paged = run(models, cfg, everyone, rows=len(PROMPTS))
    assert_pages_back(paged)
    assert all(t.counters["preempted"] == 0 for t in want)
    assert sum(t.counters["backtracks"] for t in want) > 0 or policy_of(mode).on_stray is None  # corrections fire
    for rows in (1, 2):
        got, paged = run(models, cfg, everyone, rows=rows)
        assert_same(got, want)
        assert_pages_back(paged)
    # a small pool, in both orders: the row admitted last is preempted first, so each row is
    # preempted in one order or the other
    preempted = [0] * len(PROMPTS)
    full = tokens_per_row(max(map(len, PROMPTS)), cfg)
    assert full < SMALL_POOL < 2 * full
    for order in (everyone, everyone[::-1]):
        got, paged = run(models, cfg, order, rows=len(PROMPTS), pool_tokens=SMALL_POOL)
        assert_same(got, want)
        assert_pages_back(paged)
        preempted = [p + t.counters["preempted"] for p, t in zip(preempted, got)]
    assert all(p >= 1 for p in preempted), preempted


def test_preempted_rows_keep_the_caches_aligned_every_round(models, monkeypatch):
    cfg = config("step_motab")
    longest = max(map(len, PROMPTS))
    student, teacher = (paged_for_rollouts(m, 3, longest, cfg, SMALL_POOL) for m in models)
    checked = check_invariant_every_round(monkeypatch, student, teacher)
    out = rollout(student, teacher, PROMPTS, cfg, seeds=SEEDS, tokenizer=TOKENIZER, max_rows=3)
    assert sum(t.counters["preempted"] for t in out) > 0 and len(checked) > 20
    assert_pages_back((student, teacher))


def test_rows_are_handed_over_as_they_finish(models):
    cfg = config("step_motab")
    finished = []
    out = rollout(*models, PROMPTS, cfg, seeds=SEEDS, tokenizer=TOKENIZER, max_rows=2,
                  on_finished=lambda i, t: finished.append((i, t)))  # fmt: skip
    assert sorted(i for i, _ in finished) == list(range(len(PROMPTS)))
    assert all(t is out[i] for i, t in finished)


def test_a_pool_smaller_than_a_prompt_is_refused_in_one_line(models):
    cfg = config("on_policy")
    long_prompt = TOKENIZER.encode("x = 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 1", add_special_tokens=False)
    with pytest.raises(OutOfBlocksError, match=f"prompt of {len(long_prompt)} tokens .* nothing was started"):
        rollout(*models, [long_prompt], replace(cfg, kv_tokens=8), tokenizer=TOKENIZER)


def test_max_rows_must_be_positive(models):
    with pytest.raises(ValueError, match="max_rows must be ≥ 1"):
        rollout(*models, PROMPTS, config("on_policy"), tokenizer=TOKENIZER, max_rows=0)


class StubRow:
    """What the scheduler reads of a row."""

    def __init__(self, index: int, length: int) -> None:
        self.index, self.length, self.slot, self.finished, self.preemptions = index, length, None, False, 0

    def close(self) -> None:
        """A finished row's trajectory (none here)."""


def test_the_rows_admitted_in_one_round_read_at_most_the_prefill_bound():
    """Rows' prompts ride in the round's first forward: a round admits rows until their tokens
    would pass ``prefill_tokens`` (a longer prompt alone), so a forward stays a batch's size."""
    rows = [StubRow(i, 100) for i in range(7)] + [StubRow(7, 900)]
    entered = []
    scheduler = Scheduler(rows, sys.maxsize, Unbounded(), entered.append, lambda rows: None, prefill_tokens=250)
    while active := scheduler.schedule():
        for row in active:
            row.finished = True
    assert [len(batch) for batch in entered] == [2, 2, 2, 1, 1]  # 900 tokens enter alone
    assert scheduler.most_running == 2


def test_an_unbounded_room_admits_every_row_at_once():
    rows = [StubRow(i, 50) for i in range(1000)]
    entered = []
    scheduler = Scheduler(rows, sys.maxsize, Unbounded(), entered.append, lambda rows: None)
    assert len(scheduler.schedule()) == 1000 and len(entered) == 1
    assert sorted(r.slot for r in rows) == list(range(1000))
