"""A row of a rollout and the queue of cache cuts its changes leave for the next extend.

Each row's committed state has one owner, ``Row``: ``commit`` and ``cut`` change the trajectory,
the kept teacher states, the monitor's history and both caches together. A row is given the
monitor and the cut queue, nothing else of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from motab.config import RolloutConfig
from motab.engine.trajectory import Trajectory
from motab.models import PagedModel
from motab.monitor import Monitor
from motab.policy import Policy


class CutQueue:
    """Cache truncations waiting for the next extend, per model: all cuts of a round go to a cache
    in one call (one kernel launch, not one a row)."""

    def __init__(self, models: tuple[PagedModel, ...]) -> None:
        self.models = models
        self._cuts: dict[PagedModel, dict[int, int]] = {}  # per model: row → length

    def __bool__(self) -> bool:
        return bool(self._cuts)

    def add(self, model: PagedModel, row: int, length: int) -> None:
        """Truncates ``row`` of ``model``'s cache to ``length`` (the shortest asked for wins)."""
        cuts = self._cuts.setdefault(model, {})
        cuts[row] = min(length, cuts.get(row, length))

    def cut_back(self, row: int, length: int) -> None:
        """Every cache holding more than ``length`` tokens of ``row`` goes back to ``length``; a
        cache that is behind (the student's while the teacher rewrites a step) stays behind."""
        for model in self.models:
            if model.lengths([row])[0] > length:
                self.add(model, row, length)

    def release(self, row: int) -> None:
        """A finished row gives its blocks back in every cache."""
        for model in self.models:
            self.add(model, row, 0)

    def apply(self) -> None:
        for model, cuts in self._cuts.items():
            model.truncate(list(cuts), list(cuts.values()))
        self._cuts.clear()


@dataclass
class Step:
    """The step a row is writing: where it began and what was measured of it so far."""

    start: int  # response index of its first token
    writer: str
    rewrite: bool = False  # the teacher rewriting a rejected student step (step_skd)
    separator: int = 0  # tokens a trim appended after the step's text
    teacher_logprobs: list[float] = field(default_factory=list)  # of each token, temperature 1
    student_logprobs: list[float] = field(default_factory=list)  # under the student's sampling distribution
    entropy: float | None = None  # the teacher's top-k entropy before the step


class Row:
    """One row and the only owner of its committed state: the trajectory, the teacher hidden
    states kept per token, the monitor's history of the row and both caches' lengths change
    together, through ``commit`` and ``cut``."""

    def __init__(
        self,
        index: int,
        prompt: list[int],
        seed: int,
        *,
        teacher_writes: bool,
        in_steps: bool,
        limit: int,
        monitor: Monitor,
        cuts: CutQueue,
        keep_teacher_hidden: bool,
    ) -> None:
        self.index, self.seed = index, seed  # index: the prompt's position (and the monitor's row)
        self.slot: int | None = None  # the cache row it holds while in flight (the scheduler's)
        self.trajectory = Trajectory(list(prompt))
        self._monitor, self._cuts, self._keep_hidden = monitor, cuts, keep_teacher_hidden
        self.student_draws = 0  # tokens this row's student stream has sampled (the RNG counter)
        self.teacher_draws = 0
        self.teacher_writes = teacher_writes
        self.hidden: list[torch.Tensor] = []  # teacher hidden per committed token
        self.interventions_used = 0
        self.since_intervention = 0  # response index where the current student stretch starts
        self.limit = limit  # response tokens this row may hold
        self.correction_start: int | None = None  # a root-cause correction under way
        self.step = Step(0, "teacher" if teacher_writes else "student") if in_steps else None
        self.finished = False

    @property
    def sequence(self) -> list[int]:
        """Prompt and response (a copy: the per-token paths use ``pending`` and ``length``)."""
        return self.trajectory.prompt + self.trajectory.tokens

    @property
    def pending(self) -> int:
        """The last committed token, which neither cache has read yet."""
        return (self.trajectory.tokens or self.trajectory.prompt)[-1]

    @property
    def length(self) -> int:
        """Committed tokens, prompt included."""
        return len(self.trajectory.prompt) + len(self.trajectory.tokens)

    def commit(self, tokens, source: str, scores, boundaries, teacher_hidden) -> None:
        """Appends tokens to the row; a student token's score joins the monitor's history."""
        traj = self.trajectory
        if self._keep_hidden:
            self.hidden += list(teacher_hidden)
        traj.tokens += tokens
        traj.sources += [source] * len(tokens)
        traj.scores += list(scores)
        traj.boundaries += list(boundaries)
        if source == "student":
            self._monitor.commit(self.index, list(scores))

    def cut(self, keep: int) -> None:
        """Keeps the first ``keep`` response tokens: trims the trajectory and the kept hidden
        states, rewinds the monitor, and truncates both caches to the new pending token."""
        traj = self.trajectory
        if keep < len(traj.tokens):
            # every committed student token's score is in the monitor's history, no teacher token's is
            scored_before = sum(1 for s in traj.sources[:keep] if s == "student")
            for name in ("tokens", "sources", "scores", "boundaries"):
                del getattr(traj, name)[keep:]
            del self.hidden[keep:]
            self._monitor.rewind(self.index, scored_before)
        self._cuts.cut_back(self.slot, self.length - 1)

    @property
    def preemptions(self) -> int:
        """Times the row gave its pages back mid-rollout and re-entered from its committed tokens."""
        return self.trajectory.counters["preempted"]

    @preemptions.setter
    def preemptions(self, value: int) -> None:
        self.trajectory.counters["preempted"] = value

    def release(self) -> None:
        """The finished row gives its cache blocks back (with the round's other cuts)."""
        self._cuts.release(self.slot)

    def close(self) -> Trajectory:
        """The finished row's trajectory, with the teacher hidden states it kept stacked."""
        if self._keep_hidden:
            self.trajectory.teacher_hidden = torch.stack(self.hidden) if self.hidden else None
            self.hidden = []
        return self.trajectory


def new_rows(prompts, seeds, policy: Policy, config: RolloutConfig, monitor: Monitor, cuts, keep_teacher_hidden: bool):
    """One row per prompt (token ids) with its seed, as the mode's policy starts them."""
    return [
        Row(
            index,
            list(prompt),
            seed,
            teacher_writes=policy.writer == "teacher",
            in_steps=policy.in_steps,
            limit=config.max_new_tokens,
            monitor=monitor,
            cuts=cuts,
            keep_teacher_hidden=keep_teacher_hidden,
        )
        for index, (prompt, seed) in enumerate(zip(prompts, seeds))
    ]
