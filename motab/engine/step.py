"""The step-level driver (the paper's pipeline: ``step_motab``, and the reference scripts'
baselines ``step_skd`` and ``teacher_steps``; the formulas are ``motab.steps``).

A draft ends at the end of its step (EOS, the stop string found in the decoded tail, the step or
row budget). The teacher's verify forward gives, through the fused op, the teacher log-prob of
every drafted token (the step's oracle value accumulates them) and, at a row's first position when
a step begins there, the top-k entropy of the boundary (the LM head applied to those positions
only). A finished step is trimmed if ``trim_stop`` (cut back, both caches read the separator in
one extend per model), recorded and tested: a ``root_cause`` breach finds t*, cuts the row back to
that step's start and hands the row to the teacher with a budget; a ``teacher_step`` rejection
cuts the step and the teacher writes one step, after which the student's cache catches up.
"""

from __future__ import annotations

import math

import torch

from motab.engine.rounds import Rounds, tail
from motab.engine.rows import Row, Step
from motab.engine.sampling import logprobs_of
from motab.steps import (
    SCRIPT_SEPARATOR,
    contains_stop_at_end,
    entropy_boundary,
    oracle_value,
    root_cause,
    topk_entropy,
    trim_at_stop,
)


class StepRounds(Rounds):
    reads_each_token = True  # a step ends at its stop string, which only the host finds

    @property
    def keeps_sampling_logprobs(self) -> bool:
        """step_skd compares the teacher's value with the student's own, from its sampling log-probs."""
        return self.policy.step_test == "skd_ratio"

    def draft_round(self, rows: list[Row]) -> None:
        drafts, hidden, sampled_logprobs, step_ends, offsets, verify = self.draft_and_verify(rows)
        if self.policy.step_test == "boundary":
            self._read_step_entropies(rows, verify, offsets)
        targets = [t for d in drafts for t in d]
        stats, _ = self.score(hidden, verify, targets, [math.inf] * len(targets), offsets)
        with self.phase("monitor"):
            for i, (row, draft) in enumerate(zip(rows, drafts)):
                span = slice(int(offsets[i]), int(offsets[i + 1]))
                logprobs = stats["teacher_logprob"][span]
                self._commit_step_draft(row, draft, logprobs, verify[span], sampled_logprobs[span])
        self.end_steps([(r, end) for r, end in zip(rows, step_ends) if end is not None])
        self.apply_cuts()

    def draft_length(self, row: Row) -> int:
        """A draft, cut short by the row's budget and the step's."""
        length = super().draft_length(row)
        if row.step is not None:
            length = min(length, self.config.max_step_tokens - (len(row.trajectory.tokens) - row.step.start))
        return length

    def step_end(self, row: Row, new_tokens: list[int]) -> str | None:
        """Why the row's current step ends with ``new_tokens`` appended, if it does: its writer
        wrote EOS, the stop string, the step's budget or the row's."""
        tokens, stops = row.trajectory.tokens, [self.config.step_stop]
        written = len(tokens) - row.step.start + len(new_tokens)  # the step's tokens so far
        if not written:
            return None
        if (new_tokens or tokens)[-1] in self.eos:
            return "eos"
        if contains_stop_at_end(self.tokenizer, tail(tokens, new_tokens, row.step.start, stops), stops):
            return "stop"
        if len(tokens) + len(new_tokens) >= row.limit:
            return "length"
        if written >= self.config.max_step_tokens:
            return "step_length"
        return None

    def _read_step_entropies(self, rows: list[Row], verify: torch.Tensor, offsets) -> None:
        """The teacher's top-k entropy before each step that starts with this draft: read from the
        verify forward's first position of the row (the teacher's distribution after the pending
        token), the LM head applied to those positions only."""
        starting = [i for i, r in enumerate(rows) if r.step.entropy is None and offsets[i + 1] > offsets[i]]
        if not starting:
            return
        positions = torch.tensor([int(offsets[i]) for i in starting], device=verify.device)
        logits = self.teacher.logits(verify[positions], self.vocab)
        entropies = topk_entropy(logits, self.monitor_config.entropy_top_k).tolist()
        for i, h in zip(starting, entropies):
            rows[i].step.entropy = h

    def _commit_step_draft(self, row: Row, draft, logprobs, teacher_hidden, sampled_logprobs) -> None:
        """The whole draft is committed (it ends at the step's end at the latest): the teacher's
        log-prob of each token accumulates into the step's oracle value."""
        row.commit(draft, "student", [-x for x in logprobs], [math.nan] * len(draft), teacher_hidden)
        row.step.teacher_logprobs += logprobs
        row.step.student_logprobs += sampled_logprobs

    def end_steps(self, ended: list[tuple[Row, str]]) -> None:
        """Closes the rows' finished steps: cuts the stop string off (``trim_stop``; the caches
        read the separator, all rows in one extend per model), records each step, applies the
        policy."""
        trims = [(row, self._trim(row)) for row, reason in ended if reason == "stop" and self.config.trim_stop]
        if trims:
            rows = [row for row, _ in trims]
            feeds = [[row.pending] + new[:-1] for row, (new, _) in trims]
            read = self.extend_split(self.teacher, rows, feeds)
            # the writer's caches were aligned before the cut; a student behind a teacher step catches up later
            students = [i for i, row in enumerate(rows) if row.step.writer == "student"]
            if students:
                self.extend_split(self.student, [rows[i] for i in students], [feeds[i] for i in students])
            for (row, (new, rest)), hidden in zip(trims, read):
                scores = [math.nan] * len(new)
                if rest:
                    logprobs = self._teacher_logprobs(hidden[:rest], new[:rest])
                    row.step.teacher_logprobs += logprobs
                    scores[:rest] = [-x for x in logprobs]
                row.commit(new, row.step.writer, scores, [math.nan] * len(new), hidden)
                row.step.separator = len(new) - rest
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

    def _teacher_logprobs(self, hidden: torch.Tensor, targets: list[int]) -> list[float]:
        """log p_teacher(target) at temperature 1 for a few positions (the LM head on those only)."""
        return logprobs_of(self.teacher.logits(hidden, self.vocab), torch.tensor(targets)).tolist()

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
