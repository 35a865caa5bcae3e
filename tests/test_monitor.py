"""The boundary rules on hand-made score sequences (each expected value worked out by hand), and
scans against token-by-token commits on random ones."""

import math
import random

import numpy as np
import pytest

from motab.config import MonitorConfig
from motab.monitor import Monitor


def monitor(**kw):
    return Monitor(MonitorConfig(**kw), num_rows=2)


def test_warmup_decides_nothing_then_window_rule():
    m = monitor(rule="window", window=3, window_factor=2.0, tau_min=0.1, warmup=2)
    assert m.boundary(0) == math.inf
    first, limits = m.scan(0, [5.0, 1.0, 1.0, 3.0, 2.9, 9.0])
    # tokens 0-1 are the warm-up; token 2 sees history [5, 1] → 2·3 = 6; token 3: [5,1,1] → 4.67;
    # token 4: [1,1,3] → 3.33; token 5: [1,3,2.9] → 4.6 < 9 → strays
    assert first == 5
    np.testing.assert_allclose(limits, [math.inf, math.inf, 6.0, 14 / 3, 10 / 3, 6.9 * 2 / 3])
    assert m.num_committed(0) == 0  # scan changes nothing


def test_window_floor_applies_to_an_agreeing_history():
    m = monitor(rule="window", window=4, window_factor=3.0, tau_min=0.5, warmup=0)
    m.commit(0, [0.01, 0.02, 0.0])
    assert m.boundary(0) == 0.5
    assert m.scan(0, [0.4, 0.6])[0] == 1


def test_fixed_rule_and_teacher_rank_score():
    m = monitor(rule="fixed", tau=1.5, warmup=0)
    assert m.scan(0, [1.5, 1.4, 1.6, 0.0]) == (2, [1.5, 1.5, 1.5])
    ranks = monitor(score="teacher_rank", skd_top_k=25, warmup=0)
    assert ranks.scan(0, [0.0, 24.0, 25.0])[0] == 2


def test_ema_rule_matches_its_recurrence():
    m = monitor(rule="ema", ema_decay=0.5, ema_std_factor=2.0, tau_min=0.0, warmup=1)
    m.commit(0, [1.0, 3.0])  # mean 1 → 2; var 0 → 0.5·(0 + 0.5·4) = 1
    assert m.boundary(0) == pytest.approx(2.0 + 2.0 * 1.0)
    assert m.scan(0, [3.9, 10.0])[0] == 1


def test_quantile_rule_matches_numpy():
    m = monitor(rule="quantile", quantile=0.8, tau_min=0.0, warmup=0)
    history = [0.3, 2.0, 0.1, 0.7, 1.1, 0.05, 0.9]
    m.commit(0, history)
    assert m.boundary(0) == pytest.approx(np.quantile(history, 0.8))


def test_rewind_restores_the_exact_state():
    m = monitor(rule="ema", warmup=0, tau_min=0.0)
    m.commit(0, [0.2, 0.4, 0.1])
    expected = m.boundary(0)
    m.commit(0, [5.0, 6.0])
    m.rewind(0, 3)
    assert m.boundary(0) == pytest.approx(expected)
    assert m.num_committed(0) == 3


def test_rows_are_independent_and_scores_clamped():
    m = monitor(rule="fixed", tau=0.5, warmup=0)
    m.commit(1, [9.0])
    assert m.score(-1e-7, -0.3, 4) == 0.0
    assert monitor(score="teacher_nll").score(0.2, -2.5, 4) == 2.5
    assert m.scan(0, [0.4])[0] == 1 and m.num_committed(0) == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(score="kl"), "unknown monitor score"),
        (dict(rule="median"), "unknown boundary rule"),
        (dict(window=0), "window must be"),
        (dict(ema_decay=0.0), "ema_decay"),
        (dict(quantile=1.5), "quantile"),
        (dict(warmup=-1), "warmup"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MonitorConfig(**kwargs)


@pytest.mark.parametrize("rule", ["window", "ema", "quantile", "fixed"])
def test_a_scan_decides_as_committing_token_by_token(rule):
    """``scan`` reads the committed history through (no copy); its decisions and boundaries must be
    those of a row that commits each kept draft score before the next is examined."""
    rng = random.Random(rule)
    for _ in range(300):
        config = MonitorConfig(rule=rule, warmup=rng.randint(0, 5), window=rng.randint(1, 6))
        history = [rng.choice([0.1, 0.5, 1.0, 3 * rng.random()]) for _ in range(rng.randint(0, 30))]
        draft = [rng.choice([0.5, 1.0, 3 * rng.random()]) for _ in range(rng.randint(1, 8))]
        scanned, stepwise = Monitor(config, 1), Monitor(config, 1)
        scanned.commit(0, history)
        stepwise.commit(0, history)
        boundaries, first = [], len(draft)
        for j, value in enumerate(draft):
            boundaries.append(stepwise.boundary(0))
            if value > boundaries[-1]:
                first = j
                break
            stepwise.commit(0, [value])
        assert scanned.scan(0, draft) == (first, boundaries)
        assert scanned.num_committed(0) == len(history)
