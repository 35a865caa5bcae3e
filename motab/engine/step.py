"""The step-level method (the paper's pipeline: ``step_motab``, and the reference scripts'
baselines ``step_skd`` and ``teacher_steps``; the formulas are ``motab.steps``), written once over
a ``motab.backends.StepBackend``.

Each round, the rows the student writes draft (a step ends at EOS, the stop string, the step
budget or the row's); the teacher scores the drafted tokens (their log-probs accumulate into the
step's oracle value) and, where a step begins, gives the top-k entropy of the boundary. A finished
step is trimmed if ``trim_stop`` (cut back, the separator appended), recorded and tested: a
``root_cause`` breach finds t*, rewinds the row to that step's start and hands it to the teacher
with a budget; a ``teacher_step`` rejection cuts the step and the teacher writes one step, after
which the student takes the row back. Rows the teacher writes go to the backend together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from motab.backends import Ask, StepBackend
from motab.config import RolloutConfig
from motab.engine.rows import Row, Step, new_rows
from motab.engine.schedule import run_rows
from motab.engine.trajectory import Trajectory
from motab.monitor import Monitor
from motab.policy import Policy
from motab.steps import (
    SCRIPT_SEPARATOR,
    contains_stop_at_end,
    entropy_boundary,
    oracle_value,
    root_cause,
    stop_tail,
    trim_at_stop,
)


class StepRollout:
    """One step-mode rollout: the method's decisions; the backend does the writing and reading."""

    def __init__(
        self,
        backend: StepBackend,
        config: RolloutConfig,
        policy: Policy,
        tokenizer,
        keep_teacher_hidden: bool = False,
    ) -> None:
        self.backend, self.config, self.policy, self.tokenizer = backend, config, policy, tokenizer
        self.monitor_config = config.monitor
        self.eos = set(config.eos_token_ids)
        self.keep_teacher_hidden = keep_teacher_hidden

    # ------------------------------------------------------------------------------ the loop
    def run(
        self,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        on_finished: Callable[[int, Trajectory], None] | None = None,
    ) -> list[Trajectory]:
        self.monitor = Monitor(self.monitor_config, len(prompts))
        policy, backend = self.policy, self.backend
        rows = new_rows(prompts, seeds, policy, self.config, self.monitor, backend.cuts, self.keep_teacher_hidden)
        run_rows(backend, rows, self.draft_round, self.teacher_round, on_finished)
        return [r.trajectory for r in rows]

    def draft_round(self, rows: list[Row]) -> None:
        """The student drafts (at most to its step's end), the teacher scores, the steps that
        ended are closed."""
        drafts = self.backend.draft(rows, [self._ask(r) for r in rows], self.policy.step_test == "skd_ratio")
        for row, draft in zip(rows, drafts):
            row.trajectory.counters["drafted"] += len(draft.tokens)
        entropy = [self.policy.step_test == "boundary" and r.step.entropy is None for r in rows]
        scored = self.backend.score_draft(rows, [d.tokens for d in drafts], entropy)
        ended = []
        with self.backend.phase("monitor"):
            for row, draft, score in zip(rows, drafts, scored):
                if score.entropy is not None:
                    row.step.entropy = score.entropy
                row.commit(
                    draft.tokens,
                    "student",
                    [-x for x in score.logprobs],
                    [math.nan] * len(draft.tokens),
                    _per_token(score.hidden, len(draft.tokens)),
                )
                row.step.teacher_logprobs += score.logprobs
                row.step.student_logprobs += draft.logprobs
                if draft.end is not None:
                    ended.append((row, self._step_end(row, draft.end)))
        self.end_steps(ended)

    def teacher_round(self, rows: list[Row]) -> None:
        """Rows the teacher writes: a step (step_skd's rewrite, teacher_steps) or the correction."""
        written = self.backend.teacher_write(rows, [self._ask(r) for r in rows])
        ended = []
        for row, new in zip(rows, written):
            nan = [math.nan] * len(new.tokens)
            row.commit(new.tokens, "teacher", nan, nan, _per_token(new.hidden, len(new.tokens)))
            if row.step is not None:
                if new.end is not None:
                    ended.append((row, self._step_end(row, new.end)))
            elif self.finish_if_done(row):
                self.teacher_finished(row)
                row.release()
        self.end_steps(ended)
        # rows handed back to the student (after a step_skd teacher step) read what the teacher wrote
        self.backend.student_reads([r for r in rows if not r.finished and not r.teacher_writes])

    def _ask(self, row: Row) -> Ask:
        """A step: up to its stop string, within the step's budget and the row's; a correction (no
        step): to EOS, a response stop string or the row's budget."""
        tokens = row.trajectory.tokens
        left = row.limit - len(tokens)
        if row.step is None:
            return Ask(left, tuple(self.config.stop_strings), tokens)
        step_left = self.config.max_step_tokens - (len(tokens) - row.step.start)
        return Ask(min(left, step_left), (self.config.step_stop,), tokens[row.step.start :])

    def _step_end(self, row: Row, end: str) -> str:
        """The step's end reason: a budget reached is the row's ("length") or the step's."""
        if end != "length":
            return end
        return "length" if len(row.trajectory.tokens) >= row.limit else "step_length"

    def finish_if_done(self, row: Row) -> bool:
        """Whether the row's response is over: EOS, a response stop string (in its tail), or its budget."""
        traj, stops = row.trajectory, self.config.stop_strings
        if traj.tokens and traj.tokens[-1] in self.eos:
            traj.finish_reason = "eos"
        elif stops and contains_stop_at_end(self.tokenizer, stop_tail(traj.tokens, [], 0, stops), stops):
            traj.finish_reason = "stop"
        elif len(traj.tokens) >= row.limit:
            traj.finish_reason = "length"
        row.finished = traj.finish_reason is not None
        return row.finished

    # ------------------------------------------------------------------------ closing steps
    def end_steps(self, ended: list[tuple[Row, str]]) -> None:
        """Closes the rows' finished steps: cuts the stop string off (``trim_stop``; the rest of
        its token and the separator appended, all rows together), records each step, applies the
        policy."""
        trims = [(row, self._trim(row)) for row, reason in ended if reason == "stop" and self.config.trim_stop]
        if trims:
            rows = [row for row, _ in trims]
            scored = self.backend.append(rows, [new for _, (new, _) in trims], [rest for _, (_, rest) in trims])
            for (row, (new, rest)), score in zip(trims, scored):
                scores = [math.nan] * len(new)
                row.step.teacher_logprobs += score.logprobs
                scores[:rest] = [-x for x in score.logprobs]
                row.commit(new, row.step.writer, scores, [math.nan] * len(new), _per_token(score.hidden, len(new)))
                row.step.separator = len(new) - rest
            # the writer's caches were aligned before the cut; a student behind a teacher step catches up later
            self.backend.student_reads([row for row in rows if row.step.writer == "student"])
        for row, reason in ended:
            self._close_step(row, reason)

    def _trim(self, row: Row) -> tuple[list[int], int]:
        """SGLang's cut of the stop string: the row is cut back to the step's tokens before it;
        returns the tokens to append (the re-tokenised rest of the text before the stop string,
        then the separator) and how many of them are that rest."""
        step = row.step
        keep, rest = trim_at_stop(self.tokenizer, row.trajectory.tokens[step.start :], self.config.step_stop)
        rest_ids = self.tokenizer.encode(rest, add_special_tokens=False) if rest else []
        row.cut(step.start + keep)
        del step.teacher_logprobs[keep:]  # the student's own log-probs keep the stop token, as the scripts'
        return rest_ids + self.tokenizer.encode(SCRIPT_SEPARATOR, add_special_tokens=False), len(rest_ids)

    def _close_step(self, row: Row, reason: str) -> None:
        """Records the row's finished step and acts on it: the next step begins, the row ends,
        or (a breach) the policy's correction starts."""
        step, traj = row.step, row.trajectory
        end = len(traj.tokens) - step.separator
        tokens = traj.tokens[step.start : end]
        scored = step.teacher_logprobs[: len(tokens) - (reason == "eos")]  # the EOS token is not text
        record = dict(
            start=step.start,
            tokens=tokens,
            writer=step.writer,
            end=reason,
            oracle_value=None,
            entropy=step.entropy,
            boundary=None,
            student_value=None,
            kept=True,  # whether the step stands in the final text
        )
        traj.steps.append(record)
        breach = False
        if step.writer == "student" and self.policy.unit == "step":
            value = oracle_value(scored)
            record["oracle_value"] = value
            breach = self._step_breaches(record, step)
        record["kept"] = not breach
        if breach and self.policy.on_stray == "root_cause":
            self._rewind_to_root_cause(row)
        elif breach:  # teacher_step: the teacher rewrites this step from its start
            row.cut(step.start)
            traj.counters["backtracks"] += 1
            traj.counters["discarded_tokens"] += len(tokens)
            row.teacher_writes = True
            row.step = Step(step.start, "teacher", rewrite=True)
        else:
            if step.rewrite:  # the student resumes after the teacher's step
                traj.interventions.append((step.start, end))
                row.teacher_writes = False
            row.step = Step(len(traj.tokens), "teacher" if row.teacher_writes else "student")
        if self.finish_if_done(row):
            row.release()

    def _step_breaches(self, record: dict, step: Step) -> bool:
        """The policy's test of a finished student step (an empty step never breaches)."""
        config, monitor = self.config, self.monitor_config
        value = record["oracle_value"]
        if self.policy.step_test == "boundary":
            entropy = step.entropy if monitor.adaptive_boundary else 0.0
            record["boundary"] = entropy_boundary(entropy, monitor.epsilon0, monitor.theta)
            return value is not None and value < record["boundary"]
        own = oracle_value(step.student_logprobs)
        record["student_value"] = own
        record["boundary"] = None if own is None else config.step_skd_gamma * own
        return value is not None and own is not None and not value > record["boundary"]

    def _rewind_to_root_cause(self, row: Row) -> None:
        """The paper's breach: back to the context before step t*, the teacher writes the rest of
        the solution (no stop string; EOS or max(min_correction_tokens, budget − tokens before t*))."""
        traj = row.trajectory
        student_steps = [s for s in traj.steps if s["writer"] == "student"]
        t = root_cause([s["oracle_value"] for s in student_steps], [s["boundary"] for s in student_steps])
        traj.root_cause = t
        start = student_steps[t]["start"]
        for step in student_steps[t:]:
            step["kept"] = False
        traj.counters["backtracks"] += 1
        traj.counters["discarded_tokens"] += len(traj.tokens) - start
        row.cut(start)
        row.limit = start + max(self.config.min_correction_tokens, self.config.max_new_tokens - start)
        row.teacher_writes = True
        row.step = None
        row.correction_start = start

    def teacher_finished(self, row: Row) -> None:
        """A root-cause correction written to its end is the record's intervention."""
        if row.correction_start is not None:
            row.trajectory.interventions.append((row.correction_start, len(row.trajectory.tokens)))
            row.correction_start = None


def _per_token(hidden, count: int) -> list:
    """A backend's hidden states of ``count`` tokens as ``Row.commit`` takes them (none where the
    backend has none)."""
    return [None] * count if hidden is None else list(hidden)
