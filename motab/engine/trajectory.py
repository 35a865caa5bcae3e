"""What a rollout returns: one ``Trajectory`` per row."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch


@dataclass
class Trajectory:
    """One row's rollout. ``sources[i]`` says who wrote ``tokens[i]`` ("student" or "teacher");
    ``scores``/``boundaries`` are the monitored score of a student token and the boundary it was
    held to (NaN where none applied: teacher tokens, unmonitored or warm-up tokens have +inf).

    Step modes also fill ``steps``: every step written, in order, rewound ones included, as dicts
    with ``start`` (the response index where the step began), ``tokens`` (as they stood in the
    context), ``writer``, ``end`` (why it ended), ``oracle_value``, ``entropy``, ``boundary``,
    ``student_value`` (None where not computed) and ``kept`` (whether it stands in the final
    response); and ``root_cause``: the step t* a breach rewound to (None without a breach). The
    correction is then ``interventions[-1]``."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    boundaries: list[float] = field(default_factory=list)
    discarded: list[dict] = field(default_factory=list)  # {"position", "tokens", "scores"} per backtrack
    interventions: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in tokens
    # drafted tokens, backtracks, tokens they discarded, and times the row was preempted (its pages
    # given back, recomputed from its committed tokens: the trajectory is the same)
    counters: dict = field(default_factory=lambda: dict(drafted=0, backtracks=0, discarded_tokens=0, preempted=0))
    finish_reason: str | None = None
    steps: list[dict] = field(default_factory=list)
    root_cause: int | None = None
    # [len(tokens), teacher hidden] final hidden states whose LM-head output predicted each token
    # (``rollout(..., keep_teacher_hidden=True)``): the teacher side of the distillation loss, already computed.
    teacher_hidden: torch.Tensor | None = None

    def to_dict(self) -> dict:
        """JSON-ready (NaN and inf become None; teacher_hidden is left out)."""
        out = asdict(replace(self, teacher_hidden=None))
        del out["teacher_hidden"]
        for key in ("scores", "boundaries"):
            out[key] = [None if not math.isfinite(x) else x for x in out[key]]
        return out

    @classmethod
    def from_dict(cls, record: dict) -> Trajectory:
        """The trajectory a ``to_dict`` line holds (what it made None comes back as NaN; other keys of
        the line are ignored)."""
        known = {f for f in cls.__dataclass_fields__ if f != "teacher_hidden"}
        values = {k: v for k, v in record.items() if k in known}
        for key in ("scores", "boundaries"):
            values[key] = [math.nan if x is None else x for x in values.get(key, [])]
        values["interventions"] = [tuple(span) for span in values.get("interventions", [])]
        return cls(**values)
