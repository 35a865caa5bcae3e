"""The token-level driver (the online modes: ``motab``, ``on_policy``, ``off_policy``, ``skd``,
``adaswitch``): every drafted token is held to its row's boundary (``motab.monitor``).

After a stray the row keeps its safe prefix (``token`` level: everything before the first stray
token; ``step`` level: up to the last step delimiter committed since the row's last intervention,
else token level), both caches are truncated to it (the last kept token becomes pending again),
the monitor forgets the scores past it, and the policy acts: ``intervene`` — the teacher feeds
the pending token and writes ``intervention_len`` tokens (or until it ends a step), the student's
cache then reads them in one extend and the row goes on; ``replace`` — one teacher token (SKD);
``switch`` — the teacher writes the rest of the row (AdaSwitch). Interventions of all rows ride in
one batched teacher forward per token. After ``max_interventions`` a row runs unmonitored.
"""

from __future__ import annotations

import math

from motab.engine.rounds import Rounds
from motab.engine.rows import Row


class TokenRounds(Rounds):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.budget = self.policy.intervention_budget(self.config)

    def draft_round(self, rows: list[Row]) -> None:
        drafts, hidden, _, _, offsets, verify = self.draft_and_verify(rows)
        by_op = [self._decided_by_op(r) for r in rows]
        thresholds = [self.monitor.boundary(r.index) if op else math.inf for r, op in zip(rows, by_op)]
        targets = [t for d in drafts for t in d]
        per_token = [tau for tau, d in zip(thresholds, drafts) for _ in d]
        stats, first_stray = self.score(hidden, verify, targets, per_token, offsets)
        interventions = []
        with self.phase("monitor"):
            for i, (row, draft) in enumerate(zip(rows, drafts)):
                span = slice(int(offsets[i]), int(offsets[i + 1]))
                row_stats = {k: v[span] for k, v in stats.items()}
                decided = (first_stray[i], thresholds[i]) if by_op[i] else None
                action = self._decide_and_commit(row, draft, row_stats, verify[span], decided)
                if action is not None:
                    interventions.append((row, action))
        if interventions:
            with self.phase("intervention"):
                self._intervene(interventions)
        self.apply_cuts()

    def _decided_by_op(self, row: Row) -> bool:
        """Whether the fused op's threshold comparison decides this row's draft (exactly)."""
        m = self.monitor_config
        if m.score not in ("fkl", "rkl", "jsd") or not self._monitored(row):
            return False
        if m.frozen_per_draft:
            return True
        return m.rule == "fixed" and self.monitor.num_committed(row.index) >= m.warmup

    def _monitored(self, row: Row) -> bool:
        return self.policy.unit == "token" and row.interventions_used < self.budget

    def _decide_and_commit(self, row: Row, draft: list[int], stats: dict, teacher_hidden, decided) -> str | None:
        """Commits the row's safe prefix of ``draft``; returns the intervention it needs, if any.
        ``decided`` is (first stray, boundary) when the fused op compared already."""
        traj = row.trajectory
        scores = [
            self.monitor.score(d, lp, rk)
            for d, lp, rk in zip(stats["divergence"], stats["teacher_logprob"], stats["teacher_rank"])
        ]
        if decided is not None:
            first, boundaries = decided[0], [decided[1]] * len(draft)
        elif self._monitored(row):
            first, boundaries = self.monitor.scan(row.index, scores)
        else:
            first, boundaries = len(draft), [math.nan] * len(draft)
        kept = draft[:first]
        end = next((i for i in range(len(kept)) if kept[i] in self.eos or self.stops(row, kept[: i + 1])), None)
        if end is not None:  # EOS or a stop string ends the row inside the kept prefix
            kept, first = kept[: end + 1], end + 1
        start = len(traj.tokens)
        n = len(kept)
        row.commit(kept, "student", scores[:n], boundaries[:n], teacher_hidden[:n])
        if self.finish_if_done(row):
            row.release()
            return None
        if first == len(draft):  # no stray: the last draft token is pending, caches already aligned
            return None
        traj.discarded.append(dict(position=start + len(kept), tokens=draft[first:], scores=scores[first:]))
        traj.counters["backtracks"] += 1
        traj.counters["discarded_tokens"] += len(draft) - first
        row.cut(self._rewind_point(row))
        if not self.policy.student_resumes:  # the teacher writes the rest of the row
            row.teacher_writes = True
            return None
        return self.policy.on_stray

    def _rewind_point(self, row: Row) -> int:
        """Where a token-level stray rewinds the row: its safe prefix, or with ``backtrack="step"``
        (intervening modes) just after the last delimiter of its current student stretch."""
        traj = row.trajectory
        keep = len(traj.tokens)
        if not (self.policy.on_stray == "intervene" and self.config.backtrack == "step"):
            return keep
        stretch = traj.tokens[row.since_intervention :]
        cut = next((i for i in range(len(stretch) - 1, -1, -1) if stretch[i] in self.delimiters), None)
        if cut is None or row.since_intervention + cut + 1 == keep:
            return keep
        step_end = row.since_intervention + cut + 1
        dropped = traj.tokens[step_end:]
        discarded = traj.discarded[-1]
        discarded["position"] = step_end
        discarded["tokens"] = dropped + discarded["tokens"]
        discarded["scores"] = traj.scores[step_end:] + discarded["scores"]
        traj.counters["discarded_tokens"] += len(dropped)
        return step_end

    def _intervene(self, requests: list[tuple[Row, str]]) -> None:
        """The teacher writes for every requesting row at once, then the student reads it."""
        config = self.config
        written = {row.index: [] for row, _ in requests}
        states = {row.index: [] for row, _ in requests}  # the teacher hidden behind each written token
        limits = {row.index: 1 if kind == "replace" else config.intervention_len for row, kind in requests}
        live = [row for row, _ in requests]
        feed = {row.index: [row.pending] for row in live}
        while live:
            hidden = self.extend(self.teacher, live, [feed[r.index] for r in live])
            logits = self.teacher.logits(hidden, self.vocab)
            still = []
            for j, (row, token) in enumerate(zip(live, self.sample(logits, live, teacher=True).tolist())):
                out = written[row.index]
                out.append(token)
                states[row.index].append(hidden[j])
                feed[row.index] = [token]
                ends_step = config.intervention == "step" and token in self.delimiters
                if not (
                    token in self.eos
                    or ends_step
                    or len(out) >= limits[row.index]
                    or len(row.trajectory.tokens) + len(out) >= row.limit
                    or self.stops(row, out)
                ):
                    still.append(row)
            live = still
        readers = []
        for row, kind in requests:
            tokens = written[row.index]
            start = len(row.trajectory.tokens)
            nan = [math.nan] * len(tokens)
            row.commit(tokens, "teacher", nan, nan, states[row.index])
            row.trajectory.interventions.append((start, start + len(tokens)))
            if kind == "intervene":
                row.interventions_used += 1
            row.since_intervention = len(row.trajectory.tokens)
            if self.finish_if_done(row):
                row.release()
            else:
                readers.append(row)
        self.catch_up(self.student, readers)
