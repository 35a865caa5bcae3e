"""What the step-level method asks of an inference engine, and the engines that answer.

The step algorithm (``motab.engine.step.StepRollout``: the oracle value, the entropy boundary, the
TD-error root cause, the rewind, the teacher's correction, step_skd's γ rule, teacher_steps) is
written once, over the ``StepBackend`` interface below. Two backends implement it:

- ``motab.backends.paged.PagedSteps``: our paged engine (the default). Drafts ``draft_len`` tokens a
  round, the teacher verifies each draft in one forward and the fused op scores it; a rewind is an
  in-place truncation of both caches.
- ``motab.backends.vllm.VLLMSteps``: two vLLM engines (student and teacher, each with its own
  tensor-parallel size and memory share). A draft is a whole step in one request per row (all
  rows of a round together, so vLLM's scheduler batches them); the teacher scores a step as
  prompt log-probs with its prefix cache read, so only the step's tokens are prefilled; a rewind
  costs nothing (the context before it is in the prefix cache).

Every request carries token ids, never text: the scored span is exactly the drafted tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import torch

# Why a backend stopped writing a row: its EOS, one of the asked stop strings (found in the text
# of the unit written so far), the asked budget, or (paged drafts, a chunk at a time) not yet.
ENDS = ("eos", "stop", "length")


@dataclass(frozen=True)
class Ask:
    """What a row's writer is asked for: at most ``max_tokens`` tokens, ending at EOS or at the
    first of ``stops`` in the text of ``written`` (the unit's tokens so far, kept by the caller)
    followed by the new tokens."""

    max_tokens: int
    stops: tuple[str, ...]
    written: Sequence[int] = ()


@dataclass
class Written:
    """A row's new tokens and why they ended (None: the unit goes on in a later call). ``logprobs``
    holds the writer's log-prob of each under the distribution it sampled from, where asked for;
    ``hidden`` the teacher's hidden state before each token where the backend has them."""

    tokens: list[int]
    end: str | None
    logprobs: list[float] = field(default_factory=list)
    hidden: torch.Tensor | None = None


@dataclass
class Scored:
    """The teacher's reading of tokens appended to a row: the log-prob (temperature 1) of each of the
    first ``scored`` of them, the top-k entropy of its distribution before the first one (where
    asked), and its hidden state before each (where the backend has them)."""

    logprobs: list[float]
    entropy: float | None = None
    hidden: torch.Tensor | None = None


class StepBackend(Protocol):
    """An engine the step algorithm runs on. Every call takes the rows of a round together (each a
    ``motab.engine.rows.Row``: its ``slot`` is its cache row while in flight, ``sequence`` its
    committed tokens). Which rows run each round is ``motab.engine.schedule.Scheduler``'s choice,
    within the backend's ``slots`` and ``room``."""

    # Whether ``Written.hidden``/``Scored.hidden`` are filled (``keep_teacher_hidden`` needs them).
    has_hidden: bool
    # Rows in flight at most, the pools' room (``motab.engine.schedule.Room``) and the tokens the
    # rows admitted in one round may read (None: no bound).
    slots: int
    room: object
    prefill_tokens: int | None

    def enter(self, rows: list) -> None:
        """Rows take their slots: whatever cache the backend keeps reads their committed tokens (a
        prompt, or a preempted row's work)."""

    def leave(self, rows: list) -> None:
        """Finished or preempted rows give their cache space back, at once."""

    def draft(self, rows: list, asks: list[Ask], logprobs: bool) -> list[Written]:
        """The student writes for each row, as asked; ``logprobs``: report its sampling log-probs."""

    def score_draft(self, rows: list, drafts: list[list[int]], entropy: list[bool]) -> list[Scored]:
        """The teacher scores each row's draft (the tokens of the last ``draft``): every token's
        log-prob, and the top-k entropy before the first where ``entropy[i]``."""

    def append(self, rows: list, tokens: list[list[int]], scored: list[int]) -> list[Scored]:
        """Tokens the caller appends to each row (a trimmed step's rest and separator): the teacher
        reads them and scores the first ``scored[i]``."""

    def teacher_write(self, rows: list, asks: list[Ask]) -> list[Written]:
        """The teacher writes for each row, as asked."""

    def student_reads(self, rows: list) -> None:
        """The student takes these rows back: whatever cache it keeps reads what the teacher wrote."""

    @property
    def cuts(self):
        """What ``Row.cut`` and ``Row.release`` tell about a row's new length: an object with
        ``cut_back(slot, length)`` and ``release(slot)``."""

    def phase(self, name: str) -> AbstractContextManager:
        """A timed (and profiled) block of the rollout."""

    def round(self, kind: str) -> AbstractContextManager:
        """One round ("draft" or "teacher")."""


class NoCaches:
    """The cut queue of a backend whose engine keeps no per-row cache the caller must trim (vLLM:
    a shorter prompt simply hits a shorter prefix of its cache)."""

    def cut_back(self, row: int, length: int) -> None:
        pass

    def release(self, row: int) -> None:
        pass

    def __bool__(self) -> bool:
        return False


class Unbounded:
    """The room of a backend whose engine manages its own memory (vLLM pages, batches and preempts
    the requests it is given): every round fits."""

    def spare(self, rows) -> list[int]:
        return [0]

    def need(self, row) -> list[int]:
        return [0]

    def too_small(self, row) -> str:  # never asked: fits() never says no
        raise AssertionError("an unbounded room is never too small")
