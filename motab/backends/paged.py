"""The paged engine as a step backend: the round primitives of ``motab.engine.rounds`` answering
``motab.backends.StepBackend``.

A draft is ``draft_len`` tokens at most (a step may take several rounds; the stop string is
looked for in the step's tail after every token), the teacher verifies it in one forward and the
fused op gives each token's log-prob; the boundary's entropy comes from the same forward's first
position (the LM head applied to those positions only). Cuts wait in the ``CutQueue`` and reach
both caches in one call per model before the next extend, and at the end of every round.
"""

from __future__ import annotations

import contextlib
import math

import torch

from motab.backends import Ask, Scored, Written
from motab.engine.rounds import Rounds
from motab.engine.rows import Row
from motab.engine.sampling import logprobs_of
from motab.steps import contains_stop_at_end, stop_tail, topk_entropy
from motab_kernels import ragged


class PagedSteps(Rounds):
    has_hidden = True
    reads_each_token = True  # a step ends at its stop string, which only the host finds

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._asks: dict[int, Ask] = {}
        self._sampling_logprobs = False
        self._draft_hidden: torch.Tensor | None = None  # the student's, behind the last draft's tokens
        self._round_hook = self.round
        self.round = self._round

    @contextlib.contextmanager
    def _round(self, kind: str):
        """A round, after which every cut of it has reached the caches."""
        with self._round_hook(kind):
            yield
            self.apply_cuts()

    # ------------------------------------------------------------------------ the student
    @property
    def keeps_sampling_logprobs(self) -> bool:
        return self._sampling_logprobs

    def draft(self, rows: list[Row], asks: list[Ask], logprobs: bool) -> list[Written]:
        self._asks = {r.index: a for r, a in zip(rows, asks)}
        self._sampling_logprobs = logprobs
        drafts, self._draft_hidden, sampled, ends = super().draft(rows)
        offsets = ragged.cu_seqlens([len(d) for d in drafts])
        return [
            Written(d, end, sampled[int(offsets[i]) : int(offsets[i + 1])] if logprobs else [])
            for i, (d, end) in enumerate(zip(drafts, ends))
        ]

    def draft_length(self, row: Row) -> int:
        return min(self.config.draft_len, self._asks[row.index].max_tokens)

    def step_end(self, row: Row, new_tokens: list[int]) -> str | None:
        return self._end(self._asks[row.index], new_tokens)

    def _end(self, ask: Ask, new_tokens: list[int]) -> str | None:
        """Why writing ``new_tokens`` ends as asked, if it does (checked after every token)."""
        if not new_tokens:
            return None
        if new_tokens[-1] in self.eos:
            return "eos"
        if ask.stops and contains_stop_at_end(
            self.tokenizer, stop_tail(ask.written, new_tokens, 0, ask.stops), ask.stops
        ):
            return "stop"
        return "length" if len(new_tokens) >= ask.max_tokens else None

    def student_reads(self, rows: list[Row]) -> None:
        self.catch_up(self.student, rows)

    # ------------------------------------------------------------------------ the teacher
    def score_draft(self, rows: list[Row], drafts: list[list[int]], entropy: list[bool]) -> list[Scored]:
        """One verify forward of every draft; the fused op's teacher log-probs; the entropies."""
        offsets = ragged.cu_seqlens([len(d) for d in drafts])
        verify = self.verify(rows, drafts)
        entropies = self._entropies(verify, offsets, [e and len(d) > 0 for e, d in zip(entropy, drafts)])
        targets = [t for d in drafts for t in d]
        stats, _ = self.score(self._draft_hidden, verify, targets, [math.inf] * len(targets), offsets)
        logprobs = stats["teacher_logprob"]
        spans = [slice(int(offsets[i]), int(offsets[i + 1])) for i in range(len(rows))]
        return [Scored(logprobs[s], h, verify[s]) for s, h in zip(spans, entropies)]

    def _entropies(self, verify: torch.Tensor, offsets, wanted: list[bool]) -> list[float | None]:
        """The teacher's top-k entropy at each wanted row's first verified position (its
        distribution after the pending token), the LM head applied to those positions only."""
        starting = [i for i, w in enumerate(wanted) if w]
        out: list[float | None] = [None] * len(wanted)
        if starting:
            positions = torch.tensor([int(offsets[i]) for i in starting], device=verify.device)
            logits = self.teacher.logits(verify[positions], self.vocab)
            for i, h in zip(starting, topk_entropy(logits, self.monitor_config.entropy_top_k).tolist()):
                out[i] = h
        return out

    def append(self, rows: list[Row], tokens: list[list[int]], scored: list[int]) -> list[Scored]:
        """The teacher's cache reads the tokens (all rows in one extend); the first ``scored[i]``
        get their log-probs from the LM head on those positions."""
        read = self.extend_split(self.teacher, rows, [[row.pending] + new[:-1] for row, new in zip(rows, tokens)])
        out = []
        for hidden, new, n in zip(read, tokens, scored):
            logprobs = (
                logprobs_of(self.teacher.logits(hidden[:n], self.vocab), torch.tensor(new[:n])).tolist() if n else []
            )
            out.append(Scored(logprobs, None, hidden))
        return out

    def teacher_write(self, rows: list[Row], asks: list[Ask]) -> list[Written]:
        """Up to ``draft_len`` tokens a row, one batched teacher step at a time, each row stopping
        where it ends as asked."""
        written: list[list[int]] = [[] for _ in rows]
        hidden: list[list[torch.Tensor]] = [[] for _ in rows]
        ends: list[str | None] = [None] * len(rows)
        for _ in range(self.config.draft_len):
            live = [i for i in range(len(rows)) if ends[i] is None]
            if not live:
                break
            feed = [[written[i][-1] if written[i] else rows[i].pending] for i in live]
            with self.phase("teacher_decode"):
                out = self.extend(self.teacher, [rows[i] for i in live], feed)
            logits = self.teacher.logits(out, self.vocab)
            for j, (i, token) in enumerate(
                zip(live, self.sample(logits, [rows[i] for i in live], teacher=True).tolist())
            ):
                written[i].append(token)
                hidden[i].append(out[j])
                ends[i] = self._end(asks[i], written[i])
        return [Written(w, end, [], torch.stack(h) if h else None) for w, end, h in zip(written, ends, hidden)]
