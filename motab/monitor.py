"""The adaptive safety boundary: per row, decide token by token whether the student has strayed.

State in, decisions out. The rollout engine hands each row's drafted scores (what the fused op
computed for the draft) to ``scan``, which walks them in order: a token's boundary reflects the
row's committed history plus the draft tokens before it, exactly as if the row were decided one
token at a time. ``commit`` then adds the kept scores to the history and ``rewind`` takes them
back when the engine backtracks further (step level).

Scores (``motab.config.MonitorConfig.score``), all "higher is worse":

- ``fkl`` (default): KL(teacher ‖ student) at the position — how much of the teacher's mass the
  student misses; ``rkl``: KL(student ‖ teacher); ``jsd``: TRL's generalized JSD(β). Divergences
  are clamped at 0 (rounding can leave them slightly negative).
- ``teacher_nll``: −log p_teacher(token), the teacher's surprise at the student's token.
- ``teacher_rank``: the token's rank under the teacher; it strays when outside the teacher's
  top ``skd_top_k`` (SKD's test), whatever the rule.

Rules (``MonitorConfig.rule``), each floored at ``tau_min`` so that near-zero histories (a student
that agrees with its teacher) do not make every small wobble a stray:

- ``window`` (default, AdaSwitch's): stray when d > max(K · mean of the row's last L committed
  scores, τ_min). K = 3, L = 32: a token three times as divergent as the last sentence or two.
- ``ema``: max(mean + c·std, τ_min) with exponential moving mean and variance (decay α = 0.05,
  c = 3: a three-sigma excursion over roughly the last 20 tokens).
- ``fixed``: d > τ.
- ``quantile``: max(q-quantile of all the row's committed scores, τ_min), q = 0.95.

No decision is taken until the row has ``warmup`` committed scores (its boundary reads +inf):
the opening tokens of a response are the least predictable and carry no history yet.

For divergence scores under the ``fixed`` rule, and for any rule with ``frozen_per_draft``, the
engine lets the fused op compare scores with the boundary in the same pass (exact for a fixed
boundary); otherwise it calls ``scan``, a k-step loop per row.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from motab.config import MonitorConfig


@dataclass
class _RowState:
    history: list[float] = field(default_factory=list)  # committed scores, in order
    ema_mean: float = 0.0
    ema_var: float = 0.0
    ordered: list[float] = field(default_factory=list)  # history, sorted (quantile rule only)

    @property
    def count(self) -> int:
        return len(self.history)

    def last(self, k: int) -> list[float]:
        return self.history[-k:]

    def append(self, value: float, keep_sorted: bool) -> None:
        self.history.append(value)
        if keep_sorted:  # O(length) per score: kept for the rule that reads it only
            bisect.insort(self.ordered, value)

    def quantile(self, q: float) -> float:
        return _quantile(self.ordered, q)


class Monitor:
    """Per-row boundary state for ``num_rows`` rows."""

    def __init__(self, config: MonitorConfig, num_rows: int) -> None:
        self.config = config
        self.rows = [_RowState() for _ in range(num_rows)]

    # ---------------------------------------------------------------------------------------
    def score(self, divergence: float, teacher_logprob: float, teacher_rank: int) -> float:
        """The monitored score of one token from what the fused op returned for it."""
        kind = self.config.score
        if kind == "teacher_nll":
            return -teacher_logprob
        if kind == "teacher_rank":
            return float(teacher_rank)
        return max(divergence, 0.0)

    def boundary(self, row: int) -> float:
        """The boundary the row's next token is held to (+inf during warm-up)."""
        return self._boundary(self.rows[row])

    def scan(self, row: int, scores: list[float]) -> tuple[int, list[float]]:
        """Index of the first stray among a draft's ``scores`` (``len(scores)`` if none) and the
        boundary each examined token was held to. The row's state is not changed (nor copied: a
        row's history grows to the response's length, tens of thousands of scores)."""
        draft = _Draft(self.rows[row])
        boundaries = []
        for j, value in enumerate(scores):
            limit = self._boundary(draft)
            boundaries.append(limit)
            if value > limit:
                return j, boundaries
            self._add(draft, value)
        return len(scores), boundaries

    def commit(self, row: int, scores: list[float]) -> None:
        """Adds scores of tokens the row keeps to its history."""
        for value in scores:
            self._add(self.rows[row], value)

    def rewind(self, row: int, keep: int) -> None:
        """Keeps only the row's first ``keep`` committed scores (a deeper backtrack)."""
        history = self.rows[row].history[:keep]
        self.rows[row] = _RowState()
        self.commit(row, history)

    def reset(self, row: int) -> None:
        self.rows[row] = _RowState()

    def num_committed(self, row: int) -> int:
        return len(self.rows[row].history)

    # ---------------------------------------------------------------------------------------
    def _boundary(self, state: _RowState | _Draft) -> float:
        c = self.config
        n = state.count
        if c.score == "teacher_rank":  # SKD's top-k test: rank ≥ k strays
            return c.skd_top_k - 0.5 if n >= c.warmup else math.inf
        if n < c.warmup:
            return math.inf
        if c.rule == "fixed":
            return c.tau
        if not n:
            return c.tau_min
        if c.rule == "window":
            recent = state.last(c.window)
            return max(c.window_factor * sum(recent) / len(recent), c.tau_min)
        if c.rule == "ema":
            return max(state.ema_mean + c.ema_std_factor * math.sqrt(state.ema_var), c.tau_min)
        return max(state.quantile(c.quantile), c.tau_min)

    def _add(self, state: _RowState | _Draft, value: float) -> None:
        if state.count:
            delta = value - state.ema_mean
            alpha = self.config.ema_decay
            state.ema_mean += alpha * delta
            state.ema_var = (1.0 - alpha) * (state.ema_var + alpha * delta * delta)
        else:
            state.ema_mean, state.ema_var = value, 0.0
        state.append(value, keep_sorted=self.config.rule == "quantile")


class _Draft:
    """A row's committed state plus the draft scores a scan has accepted so far, read through
    without copying the committed part."""

    def __init__(self, row: _RowState) -> None:
        self.row = row
        self.scores: list[float] = []  # accepted draft scores, in order
        self.ema_mean, self.ema_var = row.ema_mean, row.ema_var

    @property
    def count(self) -> int:
        return self.row.count + len(self.scores)

    def last(self, k: int) -> list[float]:
        """The last ``k`` scores, committed then drafted."""
        drafted = self.scores[-k:]
        if k == len(drafted):
            return drafted
        return self.row.history[max(0, len(self.row.history) - (k - len(drafted))) :] + drafted

    def append(self, value: float, keep_sorted: bool) -> None:
        self.scores.append(value)

    def quantile(self, q: float) -> float:
        merged = _MergedOrder(self.row.ordered, sorted(self.scores))
        return _quantile(merged, q)


class _MergedOrder:
    """Two sorted lists read as one (a long one and a few extra values), by position."""

    def __init__(self, long: list[float], short: list[float]) -> None:
        self.long, self.short = long, short

    def __len__(self) -> int:
        return len(self.long) + len(self.short)

    def __getitem__(self, k: int) -> float:
        """The k-th smallest (0-based): the short list's values split the long one into runs."""
        for i, value in enumerate(self.short):
            # long values before ``value``: ties go to the long list first, as one sorted list would order them
            before = bisect.bisect_right(self.long, value)
            if k < before + i:
                return self.long[k - i]
            if k == before + i:
                return value
        return self.long[k - len(self.short)]


def _quantile(ordered, q: float) -> float:
    """Linear-interpolation quantile of a sorted sequence (numpy's default method)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
