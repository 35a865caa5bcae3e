"""Causal attention of a ragged batch of new tokens over the paged KV cache.

Each row contributes a run of consecutive new tokens (decode: 1; draft verification: a few;
prefill: many) at absolute positions ``starts[i] ..``, packed by ``cu_seqlens``; every token attends to the row's cached
tokens at positions up to its own (and, with a sliding window W, above ``pos − W``). Queries are
packed ``[tokens, n_heads, head_dim]`` in row order; grouped-query and multi-query heads share a
K/V head. Slots at or past a row's length never reach the output: the Triton kernels mask their loads, the
PyTorch version zeroes them after gathering whole blocks.

``impl="triton"`` is the CUDA default (runs under the interpreter in tests); ``"torch"`` (gather +
scaled_dot_product_attention per row) is the CPU default and the reference. flash-attn's
``flash_attn_with_kvcache`` reads the same layout for uniform query lengths and block sizes that
are a multiple of 256; it is not wired in: our kernel is the tested path.

The Triton path has two routes. One program per (tile of a row's new tokens, K/V head) walks the
whole context: enough programs when there are many tiles (prefill, large decode batches with many
K/V heads). When tiles × K/V heads would leave the GPU idle (a few long decode or verification
rows: 8 rows × 32k context with 2 K/V heads is 16 programs), each tile's keys are cut into chunks,
one program per (chunk, K/V head) writes its partial output and log-sum-exp in fp32, and a second
kernel merges a token's chunks exactly (flash-decoding). ``plan_splits`` decides, on the host.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from motab_kernels import ragged
from motab_kernels._runtime import next_power_of_2, triton_interpreting, triton_usable_on
from motab_kernels.paged_attention_kernels import (
    _merge_splits_kernel,
    _paged_attention_kernel,
    _paged_attention_split_kernel,
    attention_warps,
)

# Key positions per inner step of the kernels.
_BLOCK_N = 64
# Query rows (tokens × heads of one K/V head) per program at least: tl.dot needs 16.
_MIN_BLOCK_M = 16
# Query tokens per program at most when a row brings many (prefill).
_MAX_BLOCK_Q = 16
# Split programs per SM the chunk size aims at: a memory-bound program spends its time waiting on
# loads, so the SM needs several resident at once to keep enough bytes in flight. The decode
# variant (G = 6, D = 128, bf16) takes 108 registers × 128 threads and 38 KiB of shared memory on
# sm_90 (benchmarks/kernel_resources.py), so 4 fit an SM: one full wave. To be confirmed on a GPU
# with bench_decode.py's fixed-chunk rows.
_PROGRAMS_PER_SM = 4
# Keys per split program at least: 256 keys of a 128-dim bf16 head are 128 KiB of K/V, which
# outweighs the program's 3 KiB partial write (6 heads) and its share of the merge.
_MIN_CHUNK = 256
# SMs assumed where the device reports none (CPU planning, the interpreter): an H100 SXM's.
_DEFAULT_SMS = 132
# Chunks of one token merged per step of the merge kernel: a [16, 128] fp32 tile is 16 registers
# a thread over 4 warps, and 8 rows × 32k (about 35 chunks a row) merge in three steps.
_MERGE_BLOCK_S = 16


_INT32S_PER_16_BYTES = 4


def _tiles_of(counts: np.ndarray, block_q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sequence, first token's offset within the sequence, token count) of every tile when each
    sequence's new tokens are cut into tiles of ``block_q``."""
    tile_offsets = ragged.cu_seqlens(-(-counts // block_q))
    owner = ragged.sequence_ids(tile_offsets)
    local = ragged.offsets_in_sequence(tile_offsets, owner) * block_q
    return owner, local, np.minimum(block_q, counts[owner] - local)


@dataclass
class QueryLayout:
    """Where the packed new tokens sit: built once per forward, shared by every layer.

    Attributes:
        rows: host array; the cache row each sequence of new tokens belongs to.
        starts: host array; the absolute position of each sequence's first new token (the row's
            length in the cache before them).
        cu_seqlens: host ``[len(rows) + 1]`` offsets of the sequences in the packed tokens (see
            ``motab_kernels.ragged``): sequence i is tokens ``cu_seqlens[i] : cu_seqlens[i + 1]``.
        positions: ``[tokens]`` int32 absolute position of each packed token (device).
        tiles: ``[n_tiles, 3]`` int32 (row, first packed token, token count) per kernel program.
        block_q: tokens per tile.
    """

    rows: np.ndarray
    starts: np.ndarray
    cu_seqlens: np.ndarray
    positions: torch.Tensor
    tiles: torch.Tensor
    block_q: int
    # split plans by (K/V heads, block size, window, split request, SMs): every layer of a forward
    # asks for the same one, so it is planned and copied to the device once
    split_plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, rows, starts, cu_seqlens, device: torch.device) -> QueryLayout:
        rows, starts, offsets = (np.asarray(x, dtype=np.int64).reshape(-1) for x in (rows, starts, cu_seqlens))
        counts = ragged.seq_lengths(offsets)
        owner = ragged.sequence_ids(offsets)
        positions = starts[owner] + ragged.offsets_in_sequence(offsets, owner)
        most = int(counts.max()) if len(counts) else 1
        block_q = min(next_power_of_2(max(most, 1)), _MAX_BLOCK_Q)
        tile_owner, local, tile_count = _tiles_of(counts, block_q)
        tiles = np.stack([rows[tile_owner], offsets[tile_owner] + local, tile_count], 1).reshape(-1)
        # the tiles start on a 16-byte boundary whatever the token count: Triton specialises a
        # pointer on its alignment, so an unaligned start would compile the kernel a second time
        gap = -len(positions) % _INT32S_PER_16_BYTES
        packed = np.concatenate([positions, np.zeros(gap, dtype=np.int64), tiles]).astype(np.int32)
        on_device = torch.from_numpy(packed).to(device, non_blocking=True)
        tiles_at = len(positions) + gap
        return cls(rows, starts, offsets, on_device[: len(positions)], on_device[tiles_at:].view(-1, 3), block_q)

    @property
    def counts(self) -> np.ndarray:
        """New tokens per sequence."""
        return ragged.seq_lengths(self.cu_seqlens)

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]


# ---------------------------------------------------------------------------------------------
# Split planning (host)


@dataclass(frozen=True)
class SplitPlan:
    """How the split route cuts each tile's keys: one program per (chunk, K/V head).

    Attributes:
        chunk: keys per chunk (a multiple of the cache block size); a tile's last chunk may be shorter.
        work: host ``[n_work, 3]`` (tile, first key, end key) per chunk, tile by tile in order.
        token_splits: host ``[tokens, 3]`` (first chunk of the token's tile, the tile's chunk count,
            the token's index within its tile).
        device_work, device_token_splits: the same as int32 on the device.
    """

    chunk: int
    work: np.ndarray
    token_splits: np.ndarray
    device_work: torch.Tensor
    device_token_splits: torch.Tensor

    @property
    def num_chunks(self) -> int:
        return len(self.work)


def tile_key_ranges(layout: QueryLayout, block_size: int, sliding_window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Host ``(lo, hi)`` per tile: the keys any of its tokens may attend to are ``lo .. hi − 1``
    (``hi`` = last token's position + 1; ``lo`` = the window's start below the first token,
    rounded down to a cache block, or 0)."""
    owner, local, count = _tiles_of(layout.counts, layout.block_q)
    first_pos = layout.starts[owner] + local
    hi = first_pos + count
    if sliding_window is None:
        return np.zeros_like(hi), hi
    return np.maximum(first_pos - sliding_window + 1, 0) // block_size * block_size, hi


def choose_context_chunk(keys_per_tile: np.ndarray, n_kv_heads: int, block_size: int, num_sms: int) -> int | None:
    """Keys per split program, or None where splitting does not pay.

    No split when tiles × K/V heads already give ``_PROGRAMS_PER_SM`` programs per SM (prefill,
    wide batches) or when no tile has more keys than one chunk (short contexts). Otherwise the
    keys of all tiles and heads are spread over that many programs: chunk = their share rounded
    down to a multiple of both the block size and the kernel's key step (at least ``_MIN_CHUNK``),
    so ``Σ_tiles ceil(keys / chunk) × n_kv_heads`` reaches the target whenever the minimum does not
    bind. One chunk length for all tiles keeps programs equally long over ragged rows.
    """
    target = _PROGRAMS_PER_SM * num_sms
    if len(keys_per_tile) == 0 or len(keys_per_tile) * n_kv_heads >= target:
        return None
    align = math.lcm(block_size, _BLOCK_N)
    share = int(keys_per_tile.sum()) * n_kv_heads // target
    chunk = max(share // align, -(-_MIN_CHUNK // align)) * align
    return chunk if chunk < int(keys_per_tile.max()) else None


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def plan_splits(
    layout: QueryLayout,
    n_kv_heads: int,
    block_size: int,
    sliding_window: int | None = None,
    split: int | Literal["auto", "off"] = "auto",
    num_sms: int | None = None,
) -> SplitPlan | None:
    """The split route's chunks for ``layout`` (cached on it), or None for the one-program route.

    ``split``: ``"auto"`` (``choose_context_chunk``; ``num_sms`` defaults to the device's, or
    ``_DEFAULT_SMS`` off CUDA), ``"off"``, or a chunk length in keys (a multiple of
    ``block_size``; still None when no tile has more keys than one chunk).
    """
    if split == "off" or layout.num_tokens == 0:
        return None
    if not isinstance(split, str) and (split <= 0 or split % block_size):
        raise ValueError(f"split={split}: a chunk must be a positive multiple of the block size {block_size}")
    if num_sms is None:
        num_sms = _multiprocessors(layout.positions.device)
    key = (n_kv_heads, block_size, sliding_window, split, num_sms)
    if key not in layout.split_plans:
        layout.split_plans[key] = _plan(layout, n_kv_heads, block_size, sliding_window, split, num_sms)
    return layout.split_plans[key]


def _plan(layout, n_kv_heads, block_size, sliding_window, split, num_sms) -> SplitPlan | None:
    lo, hi = tile_key_ranges(layout, block_size, sliding_window)
    keys = hi - lo
    if split == "auto":
        chunk = choose_context_chunk(keys, n_kv_heads, block_size, num_sms)
    else:
        chunk = split if split < int(keys.max()) else None
    if chunk is None:
        return None
    splits = -(-keys // chunk)
    work_offsets = ragged.cu_seqlens(splits)
    tile = ragged.sequence_ids(work_offsets)
    first = lo[tile] + ragged.offsets_in_sequence(work_offsets, tile) * chunk
    work = np.stack([tile, first, np.minimum(first + chunk, hi[tile])], 1)
    # each token's tile: its sequence's first tile plus its offset within the sequence // block_q
    sequence = ragged.sequence_ids(layout.cu_seqlens)
    local = ragged.offsets_in_sequence(layout.cu_seqlens, sequence)
    token_tile = ragged.cu_seqlens(-(-layout.counts // layout.block_q))[sequence] + local // layout.block_q
    token_splits = np.stack([work_offsets[token_tile], splits[token_tile], local % layout.block_q], 1)
    flat = np.concatenate([work.reshape(-1), token_splits.reshape(-1)]).astype(np.int32)
    on_device = torch.from_numpy(flat).to(layout.positions.device, non_blocking=True)
    return SplitPlan(
        chunk,
        work,
        token_splits,
        on_device[: work.size].view(-1, 3),
        on_device[work.size :].view(-1, 3),
    )


# ---------------------------------------------------------------------------------------------
# Entry point


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    layout: QueryLayout,
    *,
    scale: float,
    sliding_window: int | None = None,
    impl: str = "auto",
    split: int | Literal["auto", "off"] = "auto",
) -> torch.Tensor:
    """Attention output ``[tokens, n_heads, head_dim]`` of the packed new tokens over the cache.

    The new tokens' own K/V must already be in the cache (``PagedKVCache.write``). ``impl``:
    ``"triton"``, ``"torch"`` or ``"auto"`` (triton on CUDA, torch elsewhere). ``split`` (Triton
    only): cut each tile's context into chunks over several programs where that fills the GPU
    (``"auto"``, see ``choose_context_chunk``), never (``"off"``), or with this many keys per chunk
    (a multiple of the cache block size; for tests and benchmarks).
    """
    tokens, n_heads, head_dim = query.shape
    n_kv_heads = key_cache.shape[2]
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} K/V heads evenly")
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {key_cache.shape[3]}")
    if tokens != layout.num_tokens:
        raise ValueError(f"query has {tokens} tokens but the layout describes {layout.num_tokens}")
    if isinstance(split, bool) or (isinstance(split, str) and split not in ("auto", "off")):
        raise ValueError(f"split={split!r}: expected 'auto', 'off' or a chunk length in keys")
    if impl == "auto":
        impl = "triton" if query.device.type == "cuda" else "torch"
    if impl == "torch":
        return _paged_attention_torch(query, key_cache, value_cache, block_table, layout, scale, sliding_window)
    if impl != "triton":
        raise ValueError(f"unknown impl {impl!r}; expected 'auto', 'triton' or 'torch'")
    if not triton_usable_on(query.device):
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for tests)")
    out = torch.empty_like(query)
    if tokens == 0:
        return out
    query = query if query.stride(-1) == 1 else query.contiguous()
    launch = _Launch.of(query, key_cache, value_cache, block_table, layout, scale, sliding_window)
    plan = plan_splits(layout, n_kv_heads, key_cache.shape[1], sliding_window, split)
    if plan is None:
        _attend_whole_context(launch, out)
    else:
        _attend_in_chunks(launch, plan, out)
    return out


@dataclass(frozen=True)
class _Launch:
    """What both Triton routes pass their attention kernel."""

    query: torch.Tensor
    k_flat: torch.Tensor
    v_flat: torch.Tensor
    block_table: torch.Tensor
    layout: QueryLayout
    scale: float
    sliding_window: int | None
    block_size: int
    group: int
    block_m: int
    block_d: int

    @classmethod
    def of(cls, query, key_cache, value_cache, block_table, layout, scale, sliding_window) -> _Launch:
        _, n_heads, head_dim = query.shape
        n_kv_heads = key_cache.shape[2]
        group = n_heads // n_kv_heads
        return cls(
            query,
            key_cache.view(-1, n_kv_heads, head_dim),
            value_cache.view(-1, n_kv_heads, head_dim),
            block_table,
            layout,
            scale,
            sliding_window,
            key_cache.shape[1],
            group,
            max(_MIN_BLOCK_M, next_power_of_2(layout.block_q * group)),
            next_power_of_2(head_dim),
        )

    @property
    def n_kv_heads(self) -> int:
        return self.k_flat.shape[1]

    def strides(self) -> tuple[int, ...]:
        """Q's token and head, K's and V's slot and head."""
        q, k, v = self.query, self.k_flat, self.v_flat
        return q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1)

    def meta(self) -> dict:
        """The constexprs and launch options both attention kernels share."""
        return dict(
            G=self.group,
            HAS_WINDOW=self.sliding_window is not None,
            DOT_FP32=triton_interpreting(),
            PRECISION="ieee" if self.query.dtype == torch.float32 else "tf32",
            BM=self.block_m,
            BN=_BLOCK_N,
            BD=self.block_d,
            num_warps=attention_warps(self.block_m, self.block_d),
        )


def _attend_whole_context(launch: _Launch, out: torch.Tensor) -> None:
    """One program per (tile, K/V head) over everything the tile sees."""
    layout = launch.layout
    _paged_attention_kernel[(layout.num_tiles, launch.n_kv_heads)](
        launch.query,
        launch.k_flat,
        launch.v_flat,
        out,
        launch.block_table,
        layout.tiles,
        layout.positions,
        *launch.strides(),
        out.stride(0),
        out.stride(1),
        launch.block_table.stride(0),
        launch.scale,
        launch.sliding_window or 0,
        launch.query.shape[2],
        launch.block_size,
        **launch.meta(),
    )


def _attend_in_chunks(launch: _Launch, plan: SplitPlan, out: torch.Tensor) -> None:
    """One program per (chunk, K/V head) writing fp32 partials, then one per (token, head) merging them."""
    layout = launch.layout
    _, n_heads, head_dim = launch.query.shape
    part_out = torch.empty(plan.num_chunks, layout.block_q, n_heads, head_dim, device=out.device, dtype=torch.float32)
    part_lse = torch.empty(plan.num_chunks, layout.block_q, n_heads, device=out.device, dtype=torch.float32)
    _paged_attention_split_kernel[(plan.num_chunks, launch.n_kv_heads)](
        launch.query,
        launch.k_flat,
        launch.v_flat,
        part_out,
        part_lse,
        launch.block_table,
        layout.tiles,
        layout.positions,
        plan.device_work,
        *launch.strides(),
        launch.block_table.stride(0),
        n_heads,
        layout.block_q,
        launch.scale,
        launch.sliding_window or 0,
        head_dim,
        launch.block_size,
        **launch.meta(),
    )
    _merge_splits_kernel[(layout.num_tokens, n_heads)](
        part_out,
        part_lse,
        plan.device_token_splits,
        out,
        out.stride(0),
        out.stride(1),
        n_heads,
        layout.block_q,
        head_dim,
        BS=_MERGE_BLOCK_S,
        BD=launch.block_d,
    )


def _paged_attention_torch(query, key_cache, value_cache, block_table, layout, scale, sliding_window):
    """All rows at once: gather each row's blocks into a padded ``[rows, width, heads, dim]``
    batch, zero every position at or past the row's length (stale or poisoned slots never reach
    the output), then one masked scaled_dot_product_attention with grouped K/V heads."""
    block_size = key_cache.shape[1]
    device = query.device
    rows = torch.as_tensor(layout.rows, device=device)
    starts = torch.as_tensor(layout.starts, device=device)
    offsets = torch.as_tensor(layout.cu_seqlens, device=device)
    counts = ragged.seq_lengths(offsets)
    lengths = starts + counts
    num_blocks = -(-int(lengths.max()) // block_size)
    blocks = block_table[rows, :num_blocks].long().clamp_min(0)  # unused entries are -1
    keys = key_cache[blocks].flatten(1, 2)  # [rows, width, kv_heads, dim]
    values = value_cache[blocks].flatten(1, 2)
    key_pos = torch.arange(keys.shape[1], device=device)
    owned = (key_pos[None, :] < lengths[:, None])[:, :, None, None]
    keys = torch.where(owned, keys, 0)
    values = torch.where(owned, values, 0)
    # packed tokens → [rows, most, heads, dim]; padded query slots attend to key 0 and are dropped
    most = int(counts.max())
    owner = ragged.sequence_ids(offsets, query.shape[0])
    local = ragged.offsets_in_sequence(offsets, owner)
    padded = query.new_zeros(len(rows), most, *query.shape[1:])
    padded[owner, local] = query
    q_pos = starts[:, None] + torch.arange(most, device=device)[None, :]
    allowed = key_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        allowed &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    allowed[:, :, 0] |= torch.arange(most, device=device)[None, :] >= counts[:, None]
    attended = F.scaled_dot_product_attention(
        padded.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=allowed[:, None],
        scale=scale,
        enable_gqa=True,
    )
    return attended.transpose(1, 2)[owner, local]
