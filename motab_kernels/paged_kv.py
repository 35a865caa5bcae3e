"""Paged KV cache with per-row in-place truncation (backtracking without moving K/V bytes).

Layout (flash-attn's paged layout, so the same cache can be handed to ``flash_attn_with_kvcache``):
per layer one K and one V pool shaped ``(num_blocks, block_size, n_kv_heads, head_dim)``, a
``block_table`` ``(rows, max_blocks_per_row)`` int32 whose unused entries are -1, and ``seq_lens``
``(rows,)`` int32. Free block ids live on the device in a stack; its top index and every row's
length are mirrored on the host, which decides every length anyway (the rollout engine syncs at
most once per round), so all checks happen before anything changes and a bookkeeping call is one
host-to-device copy of its plan plus one kernel launch.

Block ids move between the stack and the table inside kernels (Triton on CUDA; the same index
arithmetic in PyTorch on CPU). Truncation frees whole blocks past each row's new end and lowers
``seq_lens``: no K/V byte is touched, so its cost does not depend on the context length.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from motab_kernels import ragged
from motab_kernels._runtime import triton_usable_on

# Table entries of blocks a row does not own. Never read: attention stops at seq_lens.
EMPTY_BLOCK = -1


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a call needs; nothing was changed."""


@triton.jit
def _move_blocks_kernel(
    PLAN,
    BLOCK_TABLE,
    FREE_STACK,
    SEQ_LENS,
    stack_top,
    stride_table,
    ALLOCATE: tl.constexpr,
    BJ: tl.constexpr,
):
    """Moves block ids of one row (one program per plan row) between the free stack and the table.

    Args:
        PLAN: ``[R, 5]`` int32: row, first table slot, block count, stack offset, new length.
        BLOCK_TABLE: ``[rows, max_blocks]`` int32 table; freed slots are set to -1.
        FREE_STACK: ``[num_blocks]`` int32; entries below ``stack_top`` are free block ids.
        SEQ_LENS: ``[rows]`` int32; the row's entry is set to the plan's new length.
        stack_top: number of free blocks before this call (host mirror).
        stride_table: row stride of the table.
        ALLOCATE: pop ``count`` ids into table slots ``first..`` (else push those slots' ids back).
        BJ: block ids moved per step.
    """
    i = tl.program_id(0)
    row = tl.load(PLAN + i * 5).to(tl.int64)
    first = tl.load(PLAN + i * 5 + 1)
    count = tl.load(PLAN + i * 5 + 2)
    offset = tl.load(PLAN + i * 5 + 3)
    table_row = BLOCK_TABLE + row * stride_table
    for j0 in range(0, count, BJ):
        j = j0 + tl.arange(0, BJ)
        mask = j < count
        if ALLOCATE:
            block = tl.load(FREE_STACK + (stack_top - 1 - offset - j), mask=mask)
            tl.store(table_row + first + j, block, mask=mask)
        else:
            block = tl.load(table_row + first + j, mask=mask)
            tl.store(FREE_STACK + (stack_top + offset + j), block, mask=mask)
            tl.store(table_row + first + j, tl.full((BJ,), -1, tl.int32), mask=mask)
    tl.store(SEQ_LENS + row, tl.load(PLAN + i * 5 + 4))


def _move_blocks_torch(plan, block_table, free_stack, seq_lens, stack_top: int, allocate: bool) -> None:
    """The same moves as ``_move_blocks_kernel`` with PyTorch index arithmetic (CPU)."""
    rows, first, count, offset, new_len = (plan[:, c].long() for c in range(5))
    moved = ragged.cu_seqlens(count)
    total = int(moved[-1])
    if total:
        owner = ragged.sequence_ids(moved, total)
        j = ragged.offsets_in_sequence(moved, owner)
        table_rows, table_cols = rows[owner], first[owner] + j
        if allocate:
            block_table[table_rows, table_cols] = free_stack[stack_top - 1 - offset[owner] - j]
        else:
            free_stack[stack_top + offset[owner] + j] = block_table[table_rows, table_cols]
            block_table[table_rows, table_cols] = EMPTY_BLOCK
    seq_lens[rows] = new_len.to(seq_lens.dtype)


class PagedKVCache:
    """K/V pools for ``num_layers`` layers, shared by up to ``max_rows`` rows (sequences).

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention shape.
        num_blocks: blocks in the pool, shared by all rows and counted once for all layers.
        block_size: tokens per block (flash-attn needs a multiple of 256 to read the cache).
        max_rows: rows of the block table (sequences held at once).
        max_blocks_per_row: table width; by default the whole pool (any one row may use it all).
        dtype, device: of the pools.
        impl: block bookkeeping by ``"triton"`` kernels (CUDA; CPU only under the interpreter),
            ``"torch"`` index ops, or ``"auto"`` (triton on CUDA, torch elsewhere).
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
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
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

    # ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.seq_lens.device

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    def lengths(self, rows: list[int] | None = None) -> list[int]:
        """Host copy of the rows' lengths (no device sync)."""
        return self._lens.tolist() if rows is None else self._lens[self._checked_rows(rows)].tolist()

    def blocks_for(self, lengths: list[int]) -> int:
        """How many blocks rows of these lengths hold."""
        return int(self._num_blocks_for(np.asarray(lengths, dtype=np.int64)).sum())

    def blocks_needed(self, rows: list[int], counts: list[int]) -> int:
        """How many free blocks appending ``counts[i]`` tokens to ``rows[i]`` would take."""
        rows_a, counts_a = self._checked_rows(rows), np.asarray(counts, dtype=np.int64)
        return int(
            (self._num_blocks_for(self._lens[rows_a] + counts_a) - self._num_blocks_for(self._lens[rows_a])).sum()
        )

    # ---------------------------------------------------------------------------------------
    def reserve(self, rows: list[int], counts: list[int]) -> torch.Tensor:
        """Makes room for ``counts[i]`` new tokens at the end of each ``rows[i]`` and raises the
        rows' lengths. Returns each new token's flat slot (``block · block_size + offset``), rows
        in the given order, tokens in order: where ``write`` puts their K/V.

        Raises ``OutOfBlocksError`` (nothing changed) when the pool cannot hold them, and
        ``ValueError`` for duplicate rows, negative counts, or a row past ``max_blocks_per_row``.
        """
        rows_a = self._checked_rows(rows)
        counts_a = np.asarray(counts, dtype=np.int64)
        if counts_a.shape != rows_a.shape or (counts_a < 0).any():
            raise ValueError(f"counts must be one non-negative count per row, got {counts!r} for rows {rows!r}")
        old, new = self._lens[rows_a], self._lens[rows_a] + counts_a
        old_blocks, new_blocks = self._num_blocks_for(old), self._num_blocks_for(new)
        too_long = new_blocks > self.max_blocks_per_row
        if too_long.any():
            row = int(rows_a[too_long][0])
            raise ValueError(
                f"row {row} would hold {int(new[too_long][0])} tokens, more than max_blocks_per_row "
                f"({self.max_blocks_per_row}) × block_size ({self.block_size})"
            )
        needed = new_blocks - old_blocks
        if int(needed.sum()) > self._num_free:
            raise OutOfBlocksError(
                f"KV cache exhausted: {int(needed.sum())} blocks needed for {int(counts_a.sum())} new tokens, "
                f"{self._num_free} of {self.num_blocks} free (block_size {self.block_size}); no row was changed"
            )
        offsets = np.cumsum(needed) - needed
        self._run_plan(np.stack([rows_a, old_blocks, needed, offsets, new], axis=1), allocate=True)
        self._num_free -= int(needed.sum())
        self._lens[rows_a] = new
        return self._slots(rows_a, old, counts_a)

    def truncate(self, rows: list[int], new_lens: list[int]) -> None:
        """Cuts each ``rows[i]`` back to ``new_lens[i]`` tokens in one launch: whole blocks past
        the new end go back to the free stack, their table entries are cleared, ``seq_lens``
        drops. No K/V data moves. A new length above the current one or below 0 raises
        ``ValueError`` and changes nothing."""
        rows_a = self._checked_rows(rows)
        new = np.asarray(new_lens, dtype=np.int64)
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
        offsets = np.cumsum(freed) - freed
        self._run_plan(np.stack([rows_a, kept_blocks, freed, offsets, new], axis=1), allocate=False)
        self._num_free += int(freed.sum())
        self._lens[rows_a] = new

    def reset(self, rows: list[int] | None = None) -> None:
        """Empties ``rows`` (all rows by default) for reuse."""
        rows = list(range(self.max_rows)) if rows is None else rows
        self.truncate(rows, [0] * len(rows))

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Stores ``key``/``value`` ``[tokens, n_kv_heads, head_dim]`` of ``layer`` at ``slots``."""
        k_pool, v_pool = self.key_cache[layer], self.value_cache[layer]
        k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, slots, key.to(k_pool.dtype))
        v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, slots, value.to(v_pool.dtype))

    # ---------------------------------------------------------------------------------------
    def _num_blocks_for(self, lengths: np.ndarray) -> np.ndarray:
        return -(-lengths // self.block_size)

    def _checked_rows(self, rows) -> np.ndarray:
        if isinstance(rows, torch.Tensor):  # row ids on any device: the plan is made on the host
            rows = rows.detach().cpu().numpy()
        rows_a = np.asarray(rows, dtype=np.int64).reshape(-1)
        if ((rows_a < 0) | (rows_a >= self.max_rows)).any():
            raise ValueError(f"rows must lie in [0, {self.max_rows}), got {list(rows_a)}")
        if len(np.unique(rows_a)) != len(rows_a):
            raise ValueError(f"rows must be distinct within one call, got {list(rows_a)}")
        return rows_a

    def _run_plan(self, plan: np.ndarray, allocate: bool) -> None:
        if len(plan) == 0:
            return
        plan_t = torch.from_numpy(plan.astype(np.int32)).to(self.device, non_blocking=True)
        if self._use_triton:
            _move_blocks_kernel[(len(plan),)](
                plan_t,
                self.block_table,
                self.free_stack,
                self.seq_lens,
                self._num_free,
                self.block_table.stride(0),
                ALLOCATE=allocate,
                BJ=64,
            )
        else:
            _move_blocks_torch(plan_t, self.block_table, self.free_stack, self.seq_lens, self._num_free, allocate)

    def _slots(self, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> torch.Tensor:
        offsets = ragged.cu_seqlens(counts)
        owner = ragged.sequence_ids(offsets)
        positions = starts[owner] + ragged.offsets_in_sequence(offsets, owner)
        index = torch.from_numpy(np.stack([rows[owner], positions]).astype(np.int64)).to(self.device, non_blocking=True)
        blocks = self.block_table[index[0], index[1] // self.block_size].long()
        return blocks * self.block_size + index[1] % self.block_size
