"""The round primitives both drivers share, and the round loop.

A rollout is a loop of rounds: rows the student writes draft (one batched decode step per token),
the teacher verifies every draft in one forward and the fused op scores it; rows the teacher
writes decode in batched teacher steps. What a draft's scores decide is the driver's: token by
token (``motab.engine.token``) or step by step (``motab.backends.paged``, under
``motab.engine.step``). Every cache change of a
round waits in the ``CutQueue`` and reaches the caches in one call per model before the next
extend. Data flows one way each round: schedule (which rows draft, which the teacher writes),
run (decode, verify, score), postprocess (commit, cut, correct).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from motab.config import RolloutConfig
from motab.engine.rows import CutQueue, Row, new_rows
from motab.engine.sampling import logprobs_of, sample_tokens
from motab.engine.schedule import PREFILL_TOKENS_PER_ROUND, PagePools, run_rows
from motab.engine.trajectory import Trajectory
from motab.models import PagedModel, lm_head, shared_vocab
from motab.monitor import Monitor
from motab.policy import Policy
from motab.steps import contains_stop_at_end, stop_tail
from motab_kernels import fused_linear_divergence, ragged


class Rounds:
    """One rollout's models, settings and round primitives; a driver (a subclass) says what a
    draft round decides."""

    def __init__(
        self,
        student: PagedModel,
        teacher: PagedModel,
        config: RolloutConfig,
        policy: Policy,
        tokenizer=None,
        timings: dict[str, float] | None = None,
        keep_teacher_hidden: bool = False,
        round_hook: Callable[[str], AbstractContextManager] | None = None,
        max_rows: int | None = None,
    ) -> None:
        self.student, self.teacher, self.config, self.policy = student, teacher, config, policy
        self.round = round_hook or (lambda kind: contextlib.nullcontext())
        self.models = (student, teacher)
        self.timings = timings
        self.keep_teacher_hidden = keep_teacher_hidden
        self._phases: list[str] = []  # open timing phases, innermost last
        self.vocab = shared_vocab(student, teacher, vocab_size=config.vocab_size)
        self.monitor_config = config.monitor
        self.delimiters = set(config.delimiter_token_ids)
        self.eos = set(config.eos_token_ids)
        self.tokenizer = tokenizer  # decodes tails for stop strings
        self.cuts = CutQueue(self.models)
        # per model: slot → committed tokens a row that has just entered reads with its first extend
        self._unread: dict[PagedModel, dict[int, list[int]]] = {}
        # the caches rows are prefilled into (a teacher-written mode without a student has only the teacher's)
        self.cached_models = list(dict.fromkeys((student, teacher) if policy.needs_student else (teacher,)))
        self.slots = min([m.max_rows for m in self.models] + ([max_rows] if max_rows else []))
        self.prefill_tokens = PREFILL_TOKENS_PER_ROUND
        for model in self.cached_models:  # a caller's PagedModels may hold an earlier use's rows
            model.reset()
        self.room = PagePools(self.cached_models, config)

    # ------------------------------------------------------------------------------ the loop
    def run(
        self,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        on_finished: Callable[[int, Trajectory], None] | None = None,
    ) -> list[Trajectory]:
        self.monitor = Monitor(self.monitor_config, len(prompts))
        rows = new_rows(prompts, seeds, self.policy, self.config, self.monitor, self.cuts, self.keep_teacher_hidden)
        run_rows(self, rows, self.draft_round, self.teacher_round, on_finished)
        self.apply_cuts()
        return [r.trajectory for r in rows]

    def enter(self, rows: list[Row]) -> None:
        """Rows taking cache slots will read their committed tokens but the pending one (a prompt,
        or what a preempted row had written) into the caches of the models the mode runs: with
        their first extend of each model, packed with the other rows' tokens (a prefill rides
        with the round's decode step: no forward of its own)."""
        for model in self.cached_models:  # their slots are empty: the rollout's start or leave() emptied them
            unread = self._unread.setdefault(model, {})
            for row in rows:
                unread[row.slot] = row.sequence[:-1]

    def leave(self, rows: list[Row]) -> None:
        """Finished or preempted rows give their pages back, at once."""
        for row in rows:
            self.cuts.release(row.slot)
            for unread in self._unread.values():
                unread.pop(row.slot, None)
        self.apply_cuts()

    def draft_round(self, rows: list[Row]) -> None:
        """The rows the student writes draft, the teacher verifies, the driver decides."""
        raise NotImplementedError

    # ------------------------------------------------------------------- drafting and scoring
    def draft(self, rows: list[Row]):
        """The student drafts for every row, one batched decode step per token. Returns the drafts,
        the student's hidden state behind each drafted token packed row by row, the student's
        log-prob of each token under its sampling distribution (packed the same way; only where the
        driver keeps them) and why each row's step ended (step drivers; else None).

        The sampled ids stay on the device and feed the next step there: the host reads all drafts
        once, after the last step, so the device runs the draft's steps back to back. A driver that
        reads each token as it comes (a step ends at a stop string, which only the host can find)
        says so with ``reads_each_token``."""
        lengths = [self.draft_length(r) for r in rows]
        step_ends: list[str | None] = [None] * len(rows)
        drafts: list[list[int]] = [[] for _ in rows]
        outs, ids, logprobs, lives = [], [], [], []
        with self.phase("student_decode"):
            for step in range(max(lengths)):
                live = [i for i, n in enumerate(lengths) if n > step and step_ends[i] is None]
                if not live:
                    break
                if step == 0:
                    feed = [[rows[i].pending] for i in live]
                else:  # the previous step's ids of the rows still drafting, on the device
                    feed = ids[-1][:, None] if live == lives[-1] else ids[-1][_positions_in(lives[-1], live)][:, None]
                out = self.extend(self.student, [rows[i] for i in live], feed)
                logits = self.student.logits(out, self.vocab)
                tokens = self.sample(logits, [rows[i] for i in live], teacher=False)
                if self.keeps_sampling_logprobs:
                    logprobs.append(self.sampling_logprobs(logits, tokens))
                outs.append(out)
                ids.append(tokens)
                lives.append(live)
                if self.reads_each_token:
                    for i, token in zip(live, tokens.tolist()):
                        drafts[i].append(token)
                        step_ends[i] = self.step_end(rows[i], drafts[i])
        if not self.reads_each_token and ids:
            flat = torch.cat(ids).tolist()
            for live, first in zip(lives, ragged.cu_seqlens([len(live) for live in lives])):
                for j, i in enumerate(live):
                    drafts[i].append(flat[first + j])
        order = _row_major_order(lives, len(rows))
        hidden = torch.cat(outs)[order] if outs else None
        sampled = torch.cat(logprobs)[order].tolist() if logprobs else []
        return drafts, hidden, sampled, step_ends

    # What a driver needs of a draft: whether the host reads each token as it comes (to end a
    # step at its stop string) and whether the student's sampling log-probs are kept.
    reads_each_token = False
    keeps_sampling_logprobs = False

    def step_end(self, row: Row, new_tokens: list[int]) -> str | None:
        """Why the row's draft ends with ``new_tokens`` before its length (drivers that read each token)."""
        return None

    def draft_length(self, row: Row) -> int:
        """Tokens the row drafts this round: a draft, cut short by the row's budget."""
        return min(self.config.draft_len, row.limit - len(row.trajectory.tokens))

    def draft_and_verify(self, rows: list[Row]):
        """``draft`` counted in each row's trajectory, then ``verify``: the drafts, the student's hidden
        states, its sampling log-probs, why each step ended, where each row's draft sits in the packed
        tensors (``cu_seqlens``) and the teacher's hidden states before each drafted token."""
        drafts, hidden, sampled, step_ends = self.draft(rows)
        for row, draft in zip(rows, drafts):
            row.trajectory.counters["drafted"] += len(draft)
        offsets = ragged.cu_seqlens([len(d) for d in drafts])
        return drafts, hidden, sampled, step_ends, offsets, self.verify(rows, drafts)

    def verify(self, rows: list[Row], drafts: list[list[int]]) -> torch.Tensor:
        """The teacher reads every row's ``[pending, d1 … d(k−1)]`` in one extend: its hidden
        state before each drafted token, packed row by row."""
        with self.phase("teacher_verify"):
            return self.extend(self.teacher, rows, [[r.pending] + d[:-1] for r, d in zip(rows, drafts)])

    def score(self, student_hidden, teacher_hidden, targets, thresholds, offsets):
        """Per-token statistics of the packed drafts (rows grouped by ``offsets``) and, per row, the
        op's first stray for ``thresholds``: computed on the device, read by the host at once."""
        monitor = self.monitor_config
        device = student_hidden.device
        (student_weight, student_bias), (teacher_weight, teacher_bias) = (
            lm_head(m, self.vocab) for m in (self.student, self.teacher)
        )
        with self.phase("fused_op"), torch.no_grad():
            out = fused_linear_divergence(
                student_hidden,
                student_weight,
                teacher_hidden,
                teacher_weight,
                student_bias=student_bias,
                teacher_bias=teacher_bias,
                kind=monitor.divergence_kind,
                beta=monitor.beta,
                temperature=monitor.temperature,
                # ids, offsets on the host: the op checks them there and copies them over once
                # (checking device copies would make the host wait for the device)
                target=torch.tensor(targets),
                reduction="none",
                threshold=torch.tensor(thresholds, device=device, dtype=torch.float32),
                cu_seqlens=torch.from_numpy(offsets),
            )
            # one read: float64 holds the fp32 statistics and the integer ranks and indices exactly
            columns = (out.per_token, out.teacher_logprob, out.teacher_rank, out.first_stray)
            values = torch.cat([c.double() for c in columns]).tolist()
        n = len(targets)
        stats = {
            "divergence": values[:n],
            "teacher_logprob": values[n : 2 * n],
            "teacher_rank": [int(r) for r in values[2 * n : 3 * n]],
        }
        return stats, [int(f) for f in values[3 * n :]]

    # ----------------------------------------------------------------- the teacher's rounds
    def teacher_round(self, rows: list[Row]) -> None:
        """Rows the teacher writes: up to ``draft_len`` tokens each, one batched step at a time."""
        for _ in range(self.config.draft_len):
            live = [r for r in rows if not r.finished and r.teacher_writes]
            if not live:
                break
            with self.phase("teacher_decode"):
                hidden = self.extend(self.teacher, live, [[r.pending] for r in live])
            logits = self.teacher.logits(hidden, self.vocab)
            for j, (row, token) in enumerate(zip(live, self.sample(logits, live, teacher=True).tolist())):
                row.commit([token], "teacher", [math.nan], [math.nan], hidden[j : j + 1])
                if self.finish_if_done(row):
                    row.release()
        self.apply_cuts()

    # ------------------------------------------------------------------------- the caches
    def extend(self, model: PagedModel, rows: list[Row], feeds) -> torch.Tensor:
        """``model.extend`` of ``feeds`` into the rows, after the cuts waiting for the caches; a
        row that has just entered reads its committed tokens first, in the same forward (their
        hidden states are dropped: the caller gets those of its feeds)."""
        self.apply_cuts()
        slots = [r.slot for r in rows]
        unread = self._unread.get(model)
        if not unread or not any(slot in unread for slot in slots):
            return model.extend(slots, feeds)
        leads = [unread.pop(slot, []) for slot in slots]
        if isinstance(feeds, torch.Tensor):  # ids on the device (never a round's first extend of a row)
            feeds = feeds.tolist()
        hidden = model.extend(slots, [lead + list(feed) for lead, feed in zip(leads, feeds)])
        fed = ragged.cu_seqlens([len(lead) + len(feed) for lead, feed in zip(leads, feeds)])
        kept = [k for i, lead in enumerate(leads) for k in range(int(fed[i]) + len(lead), int(fed[i + 1]))]
        return hidden[torch.tensor(kept, dtype=torch.long, device=hidden.device)]

    def extend_split(self, model: PagedModel, rows: list[Row], feeds: list[list[int]]) -> list[torch.Tensor]:
        """One extend of ``feeds[i]`` into each row; each row's new hidden states."""
        hidden = self.extend(model, rows, feeds)
        offsets = ragged.cu_seqlens([len(f) for f in feeds])
        return [hidden[int(offsets[i]) : int(offsets[i + 1])] for i in range(len(rows))]

    def apply_cuts(self) -> None:
        if not self.cuts:  # called before every extend: no profiler range, no timing sync for nothing
            return
        with self.phase("truncation"):
            self.cuts.apply()

    def catch_up(self, model: PagedModel, rows: list[Row]) -> None:
        """Feeds each row's committed tokens the model's cache has not read (all but the pending
        one), all rows in one extend."""
        self.apply_cuts()
        for row in rows:  # what a row that has just entered would read first is read here
            self._unread.get(model, {}).pop(row.slot, None)
        feeds = [r.sequence[model.lengths([r.slot])[0] : -1] for r in rows]
        behind = [(r, f) for r, f in zip(rows, feeds) if f]
        if behind:
            self.extend(model, [r for r, _ in behind], [f for _, f in behind])

    # ------------------------------------------------------------------------- sampling
    def sample(self, logits: torch.Tensor, rows: list[Row], teacher: bool) -> torch.Tensor:
        """One token per row (on the device), all rows in one batched draw; each row's draw depends
        only on its seed and its own counter, so a row samples the same whatever else is in the
        batch."""
        seeds = [(r.seed * 2 + int(teacher)) for r in rows]  # the student's and teacher's streams differ
        counters = [r.teacher_draws if teacher else r.student_draws for r in rows]
        for r in rows:
            if teacher:
                r.teacher_draws += 1
            else:
                r.student_draws += 1
        sampling = self.config.teacher_sampling if teacher else self.config.student_sampling
        return sample_tokens(logits, sampling, seeds, counters)

    def sampling_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The student's log-probability of each sampled token under the distribution it sampled
        from (temperature-scaled, before top-k/top-p, as SGLang reports it; greedy counts as
        temperature 1)."""
        return logprobs_of(logits, tokens, self.config.student_sampling.temperature or 1.0)

    # ------------------------------------------------------------------------ ending rows
    def stops(self, row: Row, new_tokens: list[int]) -> bool:
        """Whether a stop string ends the response with ``new_tokens`` appended (its tail only)."""
        stops = self.config.stop_strings
        if not (stops and self.tokenizer is not None):
            return False
        return contains_stop_at_end(self.tokenizer, stop_tail(row.trajectory.tokens, new_tokens, 0, stops), stops)

    def finish_if_done(self, row: Row) -> bool:
        traj = row.trajectory
        if traj.tokens and traj.tokens[-1] in self.eos:
            traj.finish_reason = "eos"
        elif self.stops(row, []):
            traj.finish_reason = "stop"
        elif len(traj.tokens) >= row.limit:
            traj.finish_reason = "length"
        row.finished = traj.finish_reason is not None
        return row.finished

    # ------------------------------------------------------------------------ timing
    @contextlib.contextmanager
    def phase(self, name: str):
        """Adds the wall time of the block to ``timings[name]`` (device synchronised) when timing;
        under ``torch.profiler`` the block is a range named ``motab.<name>``."""
        if torch.autograd.profiler._is_profiler_enabled:  # checked first: a range costs an op otherwise
            with torch.profiler.record_function(f"motab.{name}"), self._timed(name):
                yield
        else:
            with self._timed(name):
                yield

    @contextlib.contextmanager
    def _timed(self, name: str):
        if self.timings is None:
            yield
            return
        _synchronize(self.student.device)
        start = time.perf_counter()
        self._phases.append(name)
        try:
            yield
        finally:
            _synchronize(self.student.device)
            elapsed = time.perf_counter() - start
            self._phases.pop()
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            if self._phases:  # a phase nested in another counts once: its parent's time excludes it
                self.timings[self._phases[-1]] = self.timings.get(self._phases[-1], 0.0) - elapsed


def _positions_in(previous: list[int], current: list[int]) -> torch.Tensor:
    """Where each of ``current`` (a subsequence of ``previous``) sits in ``previous``."""
    where = {value: j for j, value in enumerate(previous)}
    return torch.tensor([where[value] for value in current])


def _row_major_order(lives: list[list[int]], num_rows: int) -> torch.Tensor:
    """The order that turns step-major packed values (step s holds one value per row of
    ``lives[s]``) into row-major (each row's values in step order)."""
    per_row: list[list[int]] = [[] for _ in range(num_rows)]
    first = 0
    for live in lives:
        for j, i in enumerate(live):
            per_row[i].append(first + j)
        first += len(live)
    return torch.tensor([k for indices in per_row for k in indices], dtype=torch.long)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
