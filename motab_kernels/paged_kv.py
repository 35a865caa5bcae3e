"""Paged KV cache with per-row in-place truncation (backtracking without moving K/V bytes).

Layout (flash-attn's paged layout, so the same cache can be handed to ``flash_attn_with_kvcache``):
per layer one K and one V pool shaped ``(num_blocks, block_size, n_kv_heads, head_dim)``, a
``block_table`` ``(rows, max_blocks_per_row)`` int32 whose unused entries are -1, and ``seq_lens``
``(rows,)`` int32. Free block ids live on the device in a stack; its top index and every row's
length are mirrored on the host, which decides every length anyway (the rollout engine syncs at
most once per round), so all checks happen before anything changes and a bookkeeping call is a
few vectorised numpy operations, one asynchronous host-to-device copy of its plan (from pinned
memory on CUDA) and one kernel launch, whatever the number of rows: nothing is read back from
the device and nothing waits for it.

Block ids move between the stack and the table inside kernels (Triton on CUDA; the same index
arithmetic in PyTorch on CPU). Truncation frees whole blocks past each row's new end and lowers
``seq_lens``: no K/V byte is touched, so its cost does not depend on the context length.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import triton
import triton.language as tl

from motab_kernels import ragged
from motab_kernels._runtime import triton_usable_on

# Table entries of blocks a row does not own. Never read: attention stops at seq_lens.
EMPTY_BLOCK = -1

# Columns of a plan: one int32 row per cache row a call touches (see ``_move_blocks_kernel``).
ROW, FIRST, COUNT, STACK, NEW_LEN, START, OUT = range(7)
PLAN_WIDTH = 7


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a call needs; nothing was changed."""


@triton.jit
def _move_blocks_kernel(
    PLAN,
    BLOCK_TABLE,
    FREE_STACK,
    SEQ_LENS,
    SLOTS,
    stride_table,
    ALLOCATE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PLAN_WIDTH: tl.constexpr,
    BJ: tl.constexpr,
    BT: tl.constexpr,
):
    """Moves one row's block ids (one program per plan row) between the free stack and the table,
    sets the row's length and, when allocating, writes the flat slots of its new tokens.

    Everything that changes from call to call is in ``PLAN`` (no scalar argument does), so a
    captured CUDA graph replays whatever plan its buffer holds.

    Args:
        PLAN: ``[R, PLAN_WIDTH]`` int32, one row per cache row: row id, first table slot moved,
            number of blocks moved, free-stack index of the first block moved, new length, old
            length, first ``SLOTS`` index of the row's new tokens (the last two read only when
            allocating).
        BLOCK_TABLE: ``[rows, max_blocks]`` int32 table; released slots are set to -1.
        FREE_STACK: ``[num_blocks]`` int32 free block ids; allocating pops the row's block ``j``
            from index ``stack - j``, releasing pushes it to index ``stack + j``.
        SEQ_LENS: ``[rows]`` int32; the row's entry is set to its new length.
        SLOTS: int64 output, allocating only: flat slot (``block · BLOCK_SIZE + offset``) of each
            new token, rows in plan order, tokens in order.
        stride_table: row stride of the table.
        ALLOCATE: pop blocks into the table (else push the table's blocks back to the stack).
        BLOCK_SIZE: tokens per block.
        PLAN_WIDTH: int32 columns per plan row.
        BJ, BT: block ids, tokens handled per step.
    """
    entry = PLAN + tl.program_id(0) * PLAN_WIDTH
    row = tl.load(entry).to(tl.int64)
    first = tl.load(entry + 1)
    count = tl.load(entry + 2)
    stack = tl.load(entry + 3)
    new_len = tl.load(entry + 4)
    table_row = BLOCK_TABLE + row * stride_table
    for j0 in range(0, count, BJ):
        j = j0 + tl.arange(0, BJ)
        mask = j < count
        if ALLOCATE:
            block = tl.load(FREE_STACK + (stack - j), mask=mask)
            tl.store(table_row + first + j, block, mask=mask)
        else:
            block = tl.load(table_row + first + j, mask=mask)
            tl.store(FREE_STACK + (stack + j), block, mask=mask)
            tl.store(table_row + first + j, tl.full((BJ,), -1, tl.int32), mask=mask)
    tl.store(SEQ_LENS + row, new_len)
    if ALLOCATE:
        start = tl.load(entry + 5)
        out = SLOTS + tl.load(entry + 6).to(tl.int64)
        for t0 in range(0, new_len - start, BT):
            t = t0 + tl.arange(0, BT)
            mask = t < new_len - start
            position = start + t
            index = position // BLOCK_SIZE
            # Blocks the row held before are in the table; new ones are read where they were
            # popped from, so no thread reads a table entry another thread of this program wrote.
            held = index < first
            old_block = tl.load(table_row + index, mask=mask & held)
            new_block = tl.load(FREE_STACK + (stack - (index - first)), mask=mask & ~held)
            block = tl.where(held, old_block, new_block).to(tl.int64)
            tl.store(out + t, block * BLOCK_SIZE + position % BLOCK_SIZE, mask=mask)


def _move_blocks_torch(
    plan: torch.Tensor,
    block_table: torch.Tensor,
    free_stack: torch.Tensor,
    seq_lens: torch.Tensor,
    slots: torch.Tensor,
    *,
    allocate: bool,
    block_size: int,
    moved_blocks: int,
    new_tokens: int,
) -> None:
    """The same moves as ``_move_blocks_kernel`` (same arguments) with PyTorch index arithmetic.

    ``moved_blocks`` and ``new_tokens`` are the plan's totals, known on the host: sizing the index
    tensors by them reads nothing back from the device.
    """
    rows, first, count, stack, new_len, start, _ = plan.long().unbind(1)
    moved = ragged.cu_seqlens(count)
    owner = ragged.sequence_ids(moved, moved_blocks)
    j = ragged.offsets_in_sequence(moved, owner)
    table_rows, table_cols = rows[owner], first[owner] + j
    if allocate:
        block_table[table_rows, table_cols] = free_stack[stack[owner] - j]
    else:
        free_stack[stack[owner] + j] = block_table[table_rows, table_cols]
        block_table[table_rows, table_cols] = EMPTY_BLOCK
    seq_lens[rows] = new_len.to(seq_lens.dtype)
    if allocate:
        added = ragged.cu_seqlens(new_len - start)
        token_owner = ragged.sequence_ids(added, new_tokens)
        position = start[token_owner] + ragged.offsets_in_sequence(added, token_owner)
        blocks = block_table[rows[token_owner], position // block_size].long()
        torch.add(blocks * block_size, position % block_size, out=slots)


class Fence(Protocol):
    """What the plan ring needs of a ``torch.cuda.Event``."""

    def record(self) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass
class _PlanSlot:
    host: np.ndarray  # [rows, width] int32 view of host_tensor: the host writes plans here
    host_tensor: torch.Tensor  # pinned on CUDA
    device: torch.Tensor  # what the kernels read: host_tensor itself on the CPU
    fence: Fence | None  # recorded after the slot's last call enqueued its last device op
    owned_by_graph: bool = False


class PlanRing:
    """Host buffers plans are written into, each with the device buffer its kernels read.

    Why a ring: on CUDA the host buffers are pinned, so uploading a plan is an asynchronous copy
    the host does not wait for (from pageable memory CUDA stages the copy synchronously). The host
    runs ahead of the GPU, so the next call may come while an earlier call's copy, or its kernel
    reading the device buffer, still waits in the stream: writing into that slot then would
    change a plan in flight. Each slot therefore carries a fence (a CUDA event) recorded after its
    call's last device op, and a call reuses the oldest slot only once its fence has passed,
    adding a slot otherwise. Querying an event neither waits nor reads device data; the ring
    settles at the caller's deepest run-ahead (a slot or two in a rollout) and allocates nothing
    after that. Fencing after the kernel, not after the copy, also covers the device buffer and a
    caller that moves to another stream between calls. Only with ``max_slots`` calls in flight
    does a call wait for the oldest (back-pressure, as CUDA's own launch queue applies when full).

    While a stream captures a CUDA graph, the graph replays its copy from the slot's buffer every
    time: such a slot is handed out once and never comes back to the ring, and no event is
    recorded or queried (both are illegal during capture).

    Without ``make_fence`` (devices other than CUDA) the upload blocks until copied, if there is
    anything to copy at all (on the CPU the kernels read the host buffer), so one slot serves every
    call. ``capturing`` tells whether the current stream captures a graph.
    """

    def __init__(
        self,
        rows: int,
        device: torch.device,
        make_fence: Callable[[], Fence] | None = None,
        *,
        width: int = PLAN_WIDTH,
        max_slots: int = 64,
        capturing: Callable[[], bool] = torch.cuda.is_current_stream_capturing,
    ) -> None:
        self._rows, self._width, self._device, self._make_fence = rows, width, device, make_fence
        self._max_slots, self._capturing = max_slots, capturing
        self._slots: collections.deque[_PlanSlot] = collections.deque([self._new_slot()])

    @classmethod
    def on(cls, device: torch.device, rows: int, *, width: int = PLAN_WIDTH) -> PlanRing:
        """A ring for ``device``: pinned and fenced by CUDA events on CUDA, one blocking slot elsewhere."""
        return cls(rows, device, torch.cuda.Event if device.type == "cuda" else None, width=width)

    @property
    def size(self) -> int:
        """Slots in the ring (in flight or free), graph-owned ones not counted."""
        return len(self._slots)

    def take(self) -> _PlanSlot:
        """A slot no call in flight uses."""
        if self._make_fence is None:
            return self._slots[0]
        if self._capturing():
            slot = self._new_slot()
            slot.owned_by_graph = True
            return slot
        oldest = self._slots[0] if self._slots else None
        if oldest is not None and (oldest.fence is None or oldest.fence.query()):
            return self._slots.popleft()
        if oldest is not None and len(self._slots) >= self._max_slots:
            oldest.fence.synchronize()
            return self._slots.popleft()
        return self._new_slot()

    def upload(self, slot: _PlanSlot, rows: int) -> torch.Tensor:
        """The first ``rows`` plan rows, on the device: one copy, asynchronous where fenced."""
        if slot.device is slot.host_tensor:
            return slot.device[:rows]
        return self.copy_into(slot, slot.device[:rows])

    def copy_into(self, slot: _PlanSlot, target: torch.Tensor) -> torch.Tensor:
        """The slot's first ``target.numel()`` host values (row-major) copied into ``target``, a
        device buffer of the caller's (a captured graph's input): asynchronous where fenced."""
        source = slot.host_tensor.view(-1)[: target.numel()].view(target.shape)
        return target.copy_(source, non_blocking=self._make_fence is not None)

    def give_back(self, slot: _PlanSlot) -> None:
        """Returns ``slot`` once its call has enqueued its last device op."""
        if self._make_fence is None or slot.owned_by_graph:
            return
        if slot.fence is None:
            slot.fence = self._make_fence()
        slot.fence.record()
        self._slots.append(slot)

    def _new_slot(self) -> _PlanSlot:
        shape = (self._rows, self._width)
        host = torch.zeros(shape, dtype=torch.int32, pin_memory=self._device.type == "cuda")
        device = host if self._device.type == "cpu" else torch.zeros(shape, dtype=torch.int32, device=self._device)
        return _PlanSlot(host=host.numpy(), host_tensor=host, device=device, fence=None)


class PagedKVCache:
    """K/V pools for ``num_layers`` layers, shared by up to ``max_rows`` rows (sequences).

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention shape.
        num_blocks: blocks in the pool, shared by all rows and counted once for all layers (one
            more, never handed out, holds ``scratch_slot``).
        block_size: tokens per block (flash-attn needs a multiple of 256 to read the cache).
        max_rows: rows of the block table (sequences held at once).
        max_blocks_per_row: table width; by default the whole pool (any one row may use it all).
        dtype, device: of the pools.
        impl: block bookkeeping by ``"triton"`` kernels (CUDA; CPU only under the interpreter),
            ``"torch"`` index ops, or ``"auto"`` (triton on CUDA, torch elsewhere).

    Bookkeeping calls (``reserve``, ``truncate``) are ordered on the caller's current stream, like
    any in-place op on the cache's tensors.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_rows: int,
        max_blocks_per_row: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        impl: str = "auto",
    ) -> None:
        sizes = dict(
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            num_blocks=num_blocks,
            block_size=block_size,
            max_rows=max_rows,
        )
        for name, value in sizes.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        device = torch.device(device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_rows = max_rows
        self.max_blocks_per_row = max_blocks_per_row or num_blocks
        # One block past the pool is never handed out: its first slot takes the K/V of padding
        # tokens (a captured decode step runs a fixed number of rows, the real ones and padding).
        self.scratch_slot = num_blocks * block_size
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.key_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_table = torch.full(
            (max_rows, self.max_blocks_per_row), EMPTY_BLOCK, dtype=torch.int32, device=device
        )
        self.seq_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
        # Popped from the top: block 0 is handed out first.
        self.free_stack = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32, device=device)
        self._lens = np.zeros(max_rows, dtype=np.int64)  # host mirror of seq_lens
        self._num_free = num_blocks  # host mirror of the stack's top
        if impl not in ("auto", "triton", "torch"):
            raise ValueError(f"unknown impl {impl!r}; expected 'auto', 'triton' or 'torch'")
        if impl == "triton" and not triton_usable_on(device):
            raise ValueError("impl='triton' needs a CUDA device (or TRITON_INTERPRET=1 for tests)")
        self._use_triton = impl == "triton" or (impl == "auto" and device.type == "cuda")
        # Persistent host scratch and buffers: a call allocates nothing but the slots it returns.
        self._plans = PlanRing.on(device, max_rows)
        self._positions = np.arange(max_rows, dtype=np.int64)
        self._row_marks = np.zeros(max_rows, dtype=np.int64)  # scratch of _all_distinct
        self._no_slots = torch.zeros(1, dtype=torch.int64, device=device)  # SLOTS of calls adding no token

    # ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.seq_lens.device

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    def lengths(self, rows: Sequence[int] | torch.Tensor | None = None) -> list[int]:
        """Host copy of the rows' lengths (no device sync)."""
        return self._lens.tolist() if rows is None else self._lens[self._checked_rows(rows)].tolist()

    def blocks_for(self, lengths: Sequence[int]) -> int:
        """How many blocks rows of these lengths hold."""
        return int(self._num_blocks_for(np.asarray(lengths, dtype=np.int64)).sum())

    def blocks_needed(self, rows: Sequence[int] | torch.Tensor, counts: Sequence[int] | torch.Tensor) -> int:
        """How many free blocks appending ``counts[i]`` tokens to ``rows[i]`` would take."""
        rows_a, counts_a = self._checked_rows(rows), _host_ints(counts)
        return int(
            (self._num_blocks_for(self._lens[rows_a] + counts_a) - self._num_blocks_for(self._lens[rows_a])).sum()
        )

    # ---------------------------------------------------------------------------------------
    def reserve(self, rows: Sequence[int] | torch.Tensor, counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Makes room for ``counts[i]`` new tokens at the end of each ``rows[i]`` and raises the
        rows' lengths. Returns each new token's flat slot (``block · block_size + offset``), rows
        in the given order, tokens in order: where ``write`` puts their K/V.

        Raises ``OutOfBlocksError`` (nothing changed) when the pool cannot hold them, and
        ``ValueError`` for duplicate rows, negative counts, or a row past ``max_blocks_per_row``.
        """
        rows_a = self._checked_rows(rows)
        counts_a = _host_ints(counts)
        if counts_a.shape != rows_a.shape or (counts_a < 0).any():
            raise ValueError(f"counts must be one non-negative count per row, got {counts!r} for rows {rows!r}")
        old = self._lens[rows_a]
        new = old + counts_a
        old_blocks, new_blocks = self._num_blocks_for(old), self._num_blocks_for(new)
        too_long = new_blocks > self.max_blocks_per_row
        if too_long.any():
            row = int(rows_a[too_long][0])
            raise ValueError(
                f"row {row} would hold {int(new[too_long][0])} tokens, more than max_blocks_per_row "
                f"({self.max_blocks_per_row}) × block_size ({self.block_size})"
            )
        needed = new_blocks - old_blocks
        total_needed, total_tokens = int(needed.sum()), int(counts_a.sum())
        if total_needed > self._num_free:
            raise OutOfBlocksError(
                f"KV cache exhausted: {total_needed} blocks needed for {total_tokens} new tokens, "
                f"{self._num_free} of {self.num_blocks} free (block_size {self.block_size}); no row was changed"
            )
        slots = torch.empty(total_tokens, dtype=torch.int64, device=self.device)
        plan_slot = self._plans.take()
        plan = plan_slot.host[: len(rows_a)]
        plan[:, ROW], plan[:, FIRST], plan[:, COUNT] = rows_a, old_blocks, needed
        # Popped from the top: each row's blocks lie below those of the rows before it.
        plan[:, STACK] = self._num_free - 1 - _exclusive_cumsum(needed)
        plan[:, NEW_LEN], plan[:, START], plan[:, OUT] = new, old, _exclusive_cumsum(counts_a)
        self._run_plan(plan_slot, len(rows_a), True, total_needed, total_tokens, slots)
        self._num_free -= total_needed
        self._lens[rows_a] = new
        return slots

    def truncate(self, rows: Sequence[int] | torch.Tensor, new_lens: Sequence[int] | torch.Tensor) -> None:
        """Cuts each ``rows[i]`` back to ``new_lens[i]`` tokens in one launch: whole blocks past
        the new end go back to the free stack, their table entries are cleared, ``seq_lens``
        drops. No K/V data moves. A new length above the current one or below 0 raises
        ``ValueError`` and changes nothing."""
        rows_a = self._checked_rows(rows)
        new = _host_ints(new_lens)
        if new.shape != rows_a.shape:
            raise ValueError(f"new_lens must have one length per row, got {new_lens!r} for rows {rows!r}")
        old = self._lens[rows_a]
        bad = (new < 0) | (new > old)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"cannot truncate row {int(rows_a[i])} of length {int(old[i])} to {int(new[i])}: the new length "
                "must lie in [0, current length]; no row was changed"
            )
        kept_blocks = self._num_blocks_for(new)
        freed = self._num_blocks_for(old) - kept_blocks
        total_freed = int(freed.sum())
        plan_slot = self._plans.take()
        plan = plan_slot.host[: len(rows_a)]
        plan[:, ROW], plan[:, FIRST], plan[:, COUNT] = rows_a, kept_blocks, freed
        # Pushed above the top: each row's blocks land above those of the rows before it.
        plan[:, STACK] = self._num_free + _exclusive_cumsum(freed)
        plan[:, NEW_LEN] = new
        self._run_plan(plan_slot, len(rows_a), False, total_freed, 0, self._no_slots)
        self._num_free += total_freed
        self._lens[rows_a] = new

    def reset(self, rows: Sequence[int] | torch.Tensor | None = None) -> None:
        """Empties ``rows`` (all rows by default) for reuse."""
        rows = self._positions if rows is None else rows
        self.truncate(rows, np.zeros(len(rows), dtype=np.int64))

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Stores ``key``/``value`` ``[tokens, n_kv_heads, head_dim]`` of ``layer`` at ``slots``."""
        k_pool, v_pool = self.key_cache[layer], self.value_cache[layer]
        k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, slots, key.to(k_pool.dtype))
        v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, slots, value.to(v_pool.dtype))

    # ---------------------------------------------------------------------------------------
    def _num_blocks_for(self, lengths: np.ndarray) -> np.ndarray:
        return -(-lengths // self.block_size)

    def _checked_rows(self, rows: Sequence[int] | torch.Tensor) -> np.ndarray:
        rows_a = _host_ints(rows).reshape(-1)
        if len(rows_a) and (rows_a.min() < 0 or rows_a.max() >= self.max_rows):
            raise ValueError(f"rows must lie in [0, {self.max_rows}), got {list(rows_a)}")
        if not self._all_distinct(rows_a):
            raise ValueError(f"rows must be distinct within one call, got {list(rows_a)}")
        return rows_a

    def _all_distinct(self, rows: np.ndarray) -> bool:
        """Whether no row id repeats, in O(rows) without sorting: each id marks its position in a
        scratch array, and a repeated id's earlier position is overwritten by a later one."""
        positions = self._positions[: len(rows)]
        self._row_marks[rows] = positions
        return bool((self._row_marks[rows] == positions).all())

    def _run_plan(
        self, plan_slot: _PlanSlot, rows: int, allocate: bool, moved_blocks: int, new_tokens: int, slots: torch.Tensor
    ) -> None:
        """Uploads the slot's first ``rows`` plan rows and applies them: one copy, one launch."""
        if rows == 0:  # nothing to copy or launch; the slot is free again at once
            self._plans.give_back(plan_slot)
            return
        plan = self._plans.upload(plan_slot, rows)
        if self._use_triton:
            _move_blocks_kernel[(rows,)](
                plan,
                self.block_table,
                self.free_stack,
                self.seq_lens,
                slots if slots.numel() else self._no_slots,  # never an empty tensor's (null) pointer
                self.block_table.stride(0),
                ALLOCATE=allocate,
                BLOCK_SIZE=self.block_size,
                PLAN_WIDTH=PLAN_WIDTH,
                BJ=64,
                BT=64,
            )
        else:
            _move_blocks_torch(
                plan,
                self.block_table,
                self.free_stack,
                self.seq_lens,
                slots,
                allocate=allocate,
                block_size=self.block_size,
                moved_blocks=moved_blocks,
                new_tokens=new_tokens,
            )
        self._plans.give_back(plan_slot)


def _host_ints(values: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """``values`` as an int64 host array. A tensor may live on any device; one on a GPU costs a
    copy back and a wait, so hot paths pass host sequences."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64)


def _exclusive_cumsum(values: np.ndarray) -> np.ndarray:
    """Sum of the values before each one: where each row's share starts in a packed run."""
    return np.cumsum(values) - values
