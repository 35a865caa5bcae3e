"""The PNG renderings: one trajectory (scores, boundary, teacher tokens, backtracks) and the demo's
accuracy curves. matplotlib is imported only when something is drawn."""

from __future__ import annotations

import math
import statistics
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_trajectory(trajectory, path: str | Path) -> None:
    """PNG of one trajectory: each token's score and boundary, teacher tokens shaded, the positions
    where a backtrack cut the row marked."""
    plt = _pyplot()
    positions = list(range(len(trajectory.tokens)))
    scores = [s if math.isfinite(s) else float("nan") for s in trajectory.scores]
    limits = [b if math.isfinite(b) else float("nan") for b in trajectory.boundaries]
    fig, ax = plt.subplots(figsize=(max(8, len(positions) / 12), 3.5))
    ax.plot(positions, scores, ".-", lw=1, label="score")
    ax.step(positions, limits, where="mid", color="tab:orange", lw=1, label="boundary")
    for start, end in trajectory.interventions:
        ax.axvspan(start - 0.5, end - 0.5, color="tab:green", alpha=0.2)
    cut_x, cut_y = [], []
    for span in trajectory.discarded:
        ax.axvline(span["position"] - 0.5, color="tab:red", lw=1, ls="--")
        kept = [(span["position"] + i, s) for i, s in enumerate(span["scores"]) if math.isfinite(s)]
        cut_x += [x for x, _ in kept]
        cut_y += [y for _, y in kept]
    if cut_x:  # the tokens each backtrack threw away, the stray among them
        ax.plot(cut_x, cut_y, "x", color="tab:red", label="discarded")
    ax.set_xlabel("response token")
    ax.set_ylabel("score")
    ax.set_title("student tokens (dots), teacher interventions (green), backtracks (red, discarded ×)")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_curves(runs: list[dict], methods: list[str], path: str | Path) -> None:
    """PNG of validation accuracy against the training step, one line per method, the mean over
    that method's runs (each run's ``curve`` is a list of (step, accuracy) pairs, alike in steps)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        steps = [s for s, _ in mine[0]["curve"]]
        mean = [statistics.mean(r["curve"][i][1] for r in mine) for i in range(len(steps))]
        ax.plot(steps, [100 * m for m in mean], marker="o", label=method)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_steps(record: dict, path: str | Path) -> None:
    """PNG of one synthesis record (``motab synthesize``): each student step's oracle value V and
    its boundary ε (log scale), the breach and the root-cause step t* marked."""
    plt = _pyplot()
    steps = [s for s in record["steps"] if s["writer"] == "student"]
    index = list(range(len(steps)))
    values = [float("nan") if s["oracle_value"] is None else s["oracle_value"] for s in steps]
    bounds = [float("nan") if s["boundary"] is None else s["boundary"] for s in steps]
    fig, ax = plt.subplots(figsize=(max(6, len(steps) / 2), 3.5))
    ax.plot(index, values, "o-", lw=1, label="oracle value V")
    ax.step(index, bounds, where="mid", color="tab:orange", lw=1, label="boundary ε")
    if record["breach"]:
        ax.plot([index[-1]], [values[-1]], "rx", ms=10, label="breach")
        ax.axvline(record["root_cause"] - 0.5, color="tab:red", ls="--", lw=1, label="t* (rewind)")
    ax.set_yscale("log")
    ax.set_xticks(index)
    ax.set_xlabel("student step")
    ax.set_title(f"record {record['id']} / response {record['response_index']}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(metrics: list[dict], path: str | Path, interventions: bool = True) -> None:
    """PNG of a training run (``metrics.jsonl``'s lines): the loss per step and, with
    ``interventions``, the teacher's interventions per 100 tokens beside it. Written as PNG
    whatever ``path`` ends in (the trainer writes a temporary name, then renames it)."""
    plt = _pyplot()
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 2 if interventions else 1, figsize=(10 if interventions else 5.5, 3.5), squeeze=False)
    axes[0][0].plot(steps, [m["loss"] for m in metrics], ".-", lw=1)
    axes[0][0].set_xlabel("step")
    axes[0][0].set_ylabel("loss")
    if interventions:
        axes[0][1].plot(steps, [m["interventions_per_100"] for m in metrics], ".-", lw=1, color="tab:green")
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("interventions per 100 tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
