"""Which rows a round runs: continuous batching over cache slots, pages on demand, preemption by
recompute (vLLM v1's scheduler in spirit, at the granularity of our rounds).

Rows wait in prompt order. Before each round the scheduler retires the rows that finished (their
pages go back to the pools at once and ``on_finished`` hears of them), then, while the round the
running rows are about to run might not fit the pools, gives the most recently admitted row's
pages back (it waits at the head of the queue and re-enters later from its committed tokens: a
prefill; its sampling counters stay with it, so what it writes does not change), then admits
waiting rows into free slots while their first round fits beside the running rows' rounds.
Data flows one way: schedule, run the round, postprocess.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Protocol

from motab.config import ConfigError, RolloutConfig
from motab.engine.rows import Row
from motab.engine.trajectory import Trajectory
from motab.models import PagedModel
from motab.policy import policy_of
from motab_kernels import OutOfBlocksError


class KVPoolTooSmall(OutOfBlocksError, ConfigError):
    """The KV pool cannot hold one row's next round even alone: the user's pool size (or budget)
    must change. An ``OutOfBlocksError`` for the API, a one-line error for the commands."""


# Tokens the rows admitted in one round read at most (a prompt longer than this is admitted alone):
# they ride in the round's first forward of each model, whose activations grow with them.
PREFILL_TOKENS_PER_ROUND = 16384

# Cache room for the separator a trimmed step appends past the budget ("\n\n" is one or two tokens,
# after the re-tokenised rest of the stop string's token).
SEPARATOR_ROOM = 8


def tokens_per_row(prompt_len: int, config: RolloutConfig) -> int:
    """The most tokens a row's cache can hold during a rollout: prompt, response, a draft past
    the committed tokens and an intervention (step modes: a root-cause correction may run
    ``min_correction_tokens`` past the budget, and a trimmed step reads a few separator tokens)."""
    extra = config.min_correction_tokens + SEPARATOR_ROOM if policy_of(config.mode).in_steps else 0
    return prompt_len + config.max_new_tokens + config.draft_len + config.intervention_len + 1 + extra


def round_headroom(config: RolloutConfig) -> int:
    """The most tokens one round adds to a row's caches past its committed tokens: a draft, an
    intervention or a trimmed step's separator, and, the same round, the teacher's turn (a row the
    draft round handed to the teacher writes in the teacher round)."""
    return 2 * config.draft_len + config.intervention_len + SEPARATOR_ROOM + 1


def round_tokens(length: int, prompt_len: int, config: RolloutConfig) -> int:
    """The most tokens a row's caches hold by the end of its next round: its ``length`` committed
    tokens and a round's headroom, never more than its whole budget."""
    return min(length + round_headroom(config), tokens_per_row(prompt_len, config))


def whole_budget_tokens(rows: int, longest_prompt: int, config: RolloutConfig) -> int:
    """A pool holding ``rows`` rows at their whole budget, each with room for a partial block."""
    return (tokens_per_row(longest_prompt, config) + config.block_size) * rows


def memory_pool_tokens(free_bytes: int, bytes_per_token: int, config: RolloutConfig) -> int:
    """Tokens each pool holds when the pools share ``kv_memory`` of ``free_bytes`` of device memory
    (``bytes_per_token``: all pools' K and V of one token)."""
    return int(free_bytes * config.kv_memory) // bytes_per_token


class Room(Protocol):
    """What the scheduler asks of the caches, per pool (the paged engine has one per model)."""

    def spare(self, rows: Sequence[Row]) -> list[int]:
        """Blocks each pool has left once ``rows`` (holding their pages) have taken their next
        round: negative where it does not fit."""

    def need(self, row: Row) -> list[int]:
        """Blocks ``row``, holding none, takes in each pool for its next round."""

    def too_small(self, row: Row) -> str:
        """Why the pools cannot hold ``row``'s next round even with every other row out."""


class PagePools:
    """The paged models' pools: a row takes pages as it grows, a round of it at most
    ``round_tokens``."""

    def __init__(self, models: Sequence[PagedModel], config: RolloutConfig) -> None:
        self.models, self.config = list(models), config

    def _round_tokens(self, row: Row) -> int:
        return round_tokens(row.length, len(row.trajectory.prompt), self.config)

    def spare(self, rows: Sequence[Row]) -> list[int]:
        target = [self._round_tokens(r) for r in rows]
        slots = [r.slot for r in rows]
        out = []
        for model in self.models:
            held = model.lengths(slots) if slots else []  # one host read for all rows
            out.append(model.num_free_blocks - model.blocks_needed(target) + model.blocks_needed(held))
        return out

    def need(self, row: Row) -> list[int]:
        return [model.blocks_needed([self._round_tokens(row)]) for model in self.models]

    def too_small(self, row: Row) -> str:
        tokens = self._round_tokens(row)
        model = min(self.models, key=lambda m: m.capacity_tokens)
        return (
            f"KV pool too small: it holds {model.capacity_tokens} tokens and row {row.index} needs {tokens} for its "
            f"next round alone ({row.length} committed, prompt {len(row.trajectory.prompt)}): raise --kv-tokens "
            "(rollout.kv_tokens) or lower max_new_tokens; the rollout stopped (rows finished before were handed "
            "over; the caches hold nothing)"
        )


class Scheduler:
    """Rows in flight: at most ``slots`` at once, as the room allows (see the module's doc).

    ``enter(rows)`` gives admitted rows their caches (they read their committed tokens, in the
    round's first forwards: ``prefill_tokens`` bounds what the rows admitted in one round read, so
    a round's forward stays the size of a batch, not of every prompt; None: no bound);
    ``leave(rows)`` takes finished or preempted rows' pages back; ``on_finished(index,
    trajectory)`` hears of each finished row once, in the order they finish (its trajectory closed:
    ``Row.close``)."""

    def __init__(
        self,
        rows: Sequence[Row],
        slots: int,
        room: Room,
        enter: Callable[[list[Row]], None],
        leave: Callable[[list[Row]], None],
        on_finished: Callable[[int, Trajectory], None] | None = None,
        prefill_tokens: int | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"a rollout needs at least one row in flight, got {slots}")
        self.waiting = collections.deque(rows)
        self.running: list[Row] = []  # in admission order: the last is preempted first
        self._slots, self._free_slots = slots, []  # slots given back; new ones are numbered on
        self.room, self._enter, self._leave = room, enter, leave
        self._on_finished = on_finished
        self._numbered = 0
        self.prefill_tokens = prefill_tokens
        self.most_running = 0

    def schedule(self) -> list[Row]:
        """The rows of the next round (empty when every row has finished)."""
        self._retire()
        spare = self.room.spare(self.running)
        while self.running and min(spare) < 0:
            if len(self.running) == 1:
                raise KVPoolTooSmall(self.room.too_small(self.running[0]))
            self._preempt(self.running[-1])
            spare = self.room.spare(self.running)
        entering, reading = [], 0
        while self.waiting and (self._free_slots or self._numbered < self._slots):
            row = self.waiting[0]
            left = [s - n for s, n in zip(spare, self.room.need(row))]
            if min(left) < 0:
                if not self.running and not entering:
                    raise KVPoolTooSmall(self.room.too_small(row))
                break
            if entering and self.prefill_tokens is not None and reading + row.length > self.prefill_tokens:
                break
            self.waiting.popleft()
            row.slot = self._take_slot()
            entering.append(row)
            spare, reading = left, reading + row.length
        if entering:
            self._enter(entering)
            self.running += entering
        self.most_running = max(self.most_running, len(self.running))
        return list(self.running)

    def abandon(self) -> None:
        """A failed or interrupted rollout: the running rows give their pages back, so the caches
        are empty and reusable."""
        rows, self.running = self.running, []
        if rows:
            self._leave(rows)

    def _take_slot(self) -> int:
        """The lowest slot given back, else the next never used."""
        if self._free_slots:
            self._free_slots.sort(reverse=True)
            return self._free_slots.pop()
        self._numbered += 1
        return self._numbered - 1

    def _retire(self) -> None:
        done = [r for r in self.running if r.finished]
        if not done:
            return
        self._leave(done)
        self.running = [r for r in self.running if not r.finished]
        for row in done:
            self._free_slots.append(row.slot)
            row.slot = None
            trajectory = row.close()
            if self._on_finished is not None:
                self._on_finished(row.index, trajectory)

    def _preempt(self, row: Row) -> None:
        """``row`` gives its pages back and waits first in line; it re-enters from its committed
        tokens."""
        self._leave([row])
        self.running.remove(row)
        self._free_slots.append(row.slot)
        row.slot = None
        row.preemptions += 1
        self.waiting.appendleft(row)


def run_rows(engine, rows: Sequence[Row], draft_round, teacher_round, on_finished=None) -> None:
    """``rows`` through rounds on ``engine`` (a ``StepBackend``, or the token driver): its slots,
    room, entry and exit, prefill bound and round context."""
    scheduler = Scheduler(rows, engine.slots, engine.room, engine.enter, engine.leave, on_finished,
                          engine.prefill_tokens)  # fmt: skip
    run_rounds(scheduler, draft_round, teacher_round, engine.round)


def run_rounds(scheduler: Scheduler, draft_round, teacher_round, round_context) -> None:
    """Rounds until every row has finished: in each, the scheduler picks the rows, the rows the
    student writes draft (``draft_round``), then the rows the teacher writes get theirs
    (``teacher_round``), each inside ``round_context(kind)`` ("draft" or "teacher")."""
    try:
        while active := scheduler.schedule():
            drafting = [r for r in active if not r.teacher_writes]
            if drafting:
                with round_context("draft"):
                    draft_round(drafting)
            writing = [r for r in active if r.teacher_writes and not r.finished]
            if writing:
                with round_context("teacher"):
                    teacher_round(writing)
    except BaseException:
        scheduler.abandon()
        raise
