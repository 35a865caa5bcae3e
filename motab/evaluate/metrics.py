"""What a benchmark's graded samples add up to: mean accuracy over samples (avg@n) and the unbiased
pass@k, each with its standard error over problems; per benchmark, then over benchmarks.

pass@k is Chen et al.'s (2021) estimator from n samples of which c are correct, 1 − C(n−c, k) / C(n, k):
the chance that k samples drawn without replacement from the n hold a correct one. It is unbiased
for k ≤ n; with k = 1 it is the share correct, so pass@1 = avg@n. A standard error is the sample
standard deviation of the problems' values over √problems (the uncertainty from which problems were
asked; the sampling noise of each problem's estimate adds to it). The overall row averages the
benchmarks with equal weight, as the papers' "Avg." column does; its standard error is
√(Σ SE²) / benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with ``c`` of ``n`` samples correct (0 < k ≤ n)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k ≤ n samples, got k={k} with n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"correct samples must lie in [0, n={n}], got {c}")
    if n - c < k:
        return 1.0
    # the product form of 1 - C(n-c, k)/C(n, k): exact in floats for any n, no huge binomials
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def default_ks(n: int) -> list[int]:
    """The k of pass@k reported for n samples: 1, the powers of two below n, and n."""
    ks = [1]
    while ks[-1] * 2 < n:
        ks.append(ks[-1] * 2)
    return ks + [n] if n > 1 else ks


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / √len; 0 for one value)."""
    if not values:
        raise ValueError("no values to average")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


@dataclass
class Score:
    """One benchmark's (or the overall) figures, as fractions in [0, 1]."""

    problems: int
    samples: int  # per problem (the overall row: 0 when the benchmarks differ)
    avg: float  # avg@n: the mean accuracy over samples
    avg_se: float
    pass_at: dict[int, tuple[float, float]] = field(default_factory=dict)  # k -> (pass@k, standard error)
    answered: float = 0.0  # share of samples with an extracted answer
    finished: float = 0.0  # share of samples that ended by themselves, not at the token limit
    mean_tokens: float = 0.0

    def to_dict(self) -> dict:
        return dict(
            problems=self.problems,
            samples=self.samples,
            avg=self.avg,
            avg_se=self.avg_se,
            pass_at_k={str(k): dict(value=v, se=se) for k, (v, se) in self.pass_at.items()},
            answered=self.answered,
            finished=self.finished,
            mean_tokens=self.mean_tokens,
        )


def score(correct: Sequence[Sequence[bool]], ks: Sequence[int], *, answered: Sequence[Sequence[bool]] = (),
          finished: Sequence[Sequence[bool]] = (), tokens: Sequence[Sequence[int]] = ()) -> Score:  # fmt: skip
    """The figures of one benchmark from each problem's per-sample verdicts (every problem with the
    same number of samples); ``answered``, ``finished`` and ``tokens`` per sample, when known."""
    if not correct:
        raise ValueError("no problems to score")
    n = len(correct[0])
    if n < 1 or any(len(c) != n for c in correct):
        counts = sorted({len(c) for c in correct})
        raise ValueError(f"every problem needs the same number (≥ 1) of samples, got {counts}")
    for k in ks:
        if not 0 < k <= n:
            raise ValueError(f"pass@{k} needs at least {k} samples a problem, but there are {n} (k ≤ n)")
    avg, avg_se = mean_and_error([sum(c) / n for c in correct])
    pass_at = {k: mean_and_error([pass_at_k(n, sum(c), k) for c in correct]) for k in ks}

    def share(flags: Sequence[Sequence[bool]]) -> float:
        flat = [bool(f) for row in flags for f in row]
        return sum(flat) / len(flat) if flat else 0.0

    flat_tokens = [t for row in tokens for t in row]
    return Score(
        problems=len(correct),
        samples=n,
        avg=avg,
        avg_se=avg_se,
        pass_at=pass_at,
        answered=share(answered),
        finished=share(finished),
        mean_tokens=sum(flat_tokens) / len(flat_tokens) if flat_tokens else 0.0,
    )


def overall(scores: Sequence[Score]) -> Score:
    """The benchmarks averaged with equal weight (pass@k for the k every benchmark reports)."""
    if not scores:
        raise ValueError("no benchmarks to average")
    count = len(scores)

    def combined(pairs: list[tuple[float, float]]) -> tuple[float, float]:
        return sum(v for v, _ in pairs) / count, math.sqrt(sum(se**2 for _, se in pairs)) / count

    shared = sorted(set.intersection(*(set(s.pass_at) for s in scores)))
    samples = {s.samples for s in scores}
    avg, avg_se = combined([(s.avg, s.avg_se) for s in scores])
    return Score(
        problems=sum(s.problems for s in scores),
        samples=samples.pop() if len(samples) == 1 else 0,
        avg=avg,
        avg_se=avg_se,
        pass_at={k: combined([s.pass_at[k] for s in scores]) for k in shared},
        answered=sum(s.answered for s in scores) / count,
        finished=sum(s.finished for s in scores) / count,
        mean_tokens=sum(s.mean_tokens for s in scores) / count,
    )


def markdown_table(scores: dict[str, Score]) -> str:
    """A Markdown table of the benchmarks (and an overall row when there are several), in percent
    with standard errors."""
    ks = sorted({k for s in scores.values() for k in s.pass_at if k > 1})
    rows = dict(scores)
    if len(scores) > 1:
        rows["overall"] = overall(list(scores.values()))
    head = ["benchmark", "problems", "samples", "avg@n", *(f"pass@{k}" for k in ks), "answered", "finished", "tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in rows.items():

        def percent(pair: tuple[float, float] | None) -> str:
            return "" if pair is None else f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"

        cells = [
            name,
            str(s.problems),
            str(s.samples) if s.samples else "mixed",
            percent((s.avg, s.avg_se)),
            *(percent(s.pass_at.get(k)) for k in ks),
            f"{100 * s.answered:.1f} %",
            f"{100 * s.finished:.1f} %",
            f"{s.mean_tokens:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
