"""Causal attention of a ragged batch of new tokens over the paged KV cache.

Each row contributes a run of consecutive new tokens (decode: 1; draft verification: a few;
prefill: many) at absolute positions ``starts[i] ..``, packed by ``cu_seqlens``; every token attends to the row's cached
tokens at positions up to its own (and, with a sliding window W, above ``pos − W``). Queries are
packed ``[tokens, n_heads, head_dim]`` in row order; grouped-query and multi-query heads share a
K/V head. Slots at or past a row's length never reach the output: the Triton kernel masks their loads, the
PyTorch version zeroes them after gathering whole blocks.

``impl="triton"`` is the CUDA default (runs under the interpreter in tests); ``"torch"`` (gather +
scaled_dot_product_attention per row) is the CPU default and the reference. flash-attn's
``flash_attn_with_kvcache`` reads the same layout for uniform query lengths and block sizes that
are a multiple of 256; it is not wired in: our kernel is the tested path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from motab_kernels import ragged
from motab_kernels._runtime import next_power_of_2, triton_interpreting, triton_usable_on

# Key positions per inner step of the kernel.
_BLOCK_N = 64
# Query rows (tokens × heads of one K/V head) per program at least: tl.dot needs 16.
_MIN_BLOCK_M = 16
# Query tokens per program at most when a row brings many (prefill).
_MAX_BLOCK_Q = 16


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

    @classmethod
    def build(cls, rows, starts, cu_seqlens, device: torch.device) -> QueryLayout:
        rows, starts, offsets = (np.asarray(x, dtype=np.int64).reshape(-1) for x in (rows, starts, cu_seqlens))
        counts = ragged.seq_lengths(offsets)
        owner = ragged.sequence_ids(offsets)
        positions = starts[owner] + ragged.offsets_in_sequence(offsets, owner)
        most = int(counts.max()) if len(counts) else 1
        block_q = min(next_power_of_2(max(most, 1)), _MAX_BLOCK_Q)
        tile_offsets = ragged.cu_seqlens(-(-counts // block_q))
        tile_owner = ragged.sequence_ids(tile_offsets)
        local = ragged.offsets_in_sequence(tile_offsets, tile_owner) * block_q
        tile_count = np.minimum(block_q, counts[tile_owner] - local)
        tiles = np.stack([rows[tile_owner], offsets[tile_owner] + local, tile_count], 1).reshape(-1)
        on_device = torch.from_numpy(np.concatenate([positions, tiles]).astype(np.int32)).to(device, non_blocking=True)
        return cls(rows, starts, offsets, on_device[: len(positions)], on_device[len(positions) :].view(-1, 3), block_q)

    @property
    def counts(self) -> np.ndarray:
        """New tokens per sequence."""
        return ragged.seq_lengths(self.cu_seqlens)

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])


@triton.jit
def _paged_attention_kernel(
    Q,
    K,
    V,
    OUT,
    BLOCK_TABLE,
    TILES,
    POSITIONS,
    stride_qt,
    stride_qh,
    stride_kslot,
    stride_kh,
    stride_vslot,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_table,
    scale,
    window,
    head_dim,
    block_size,
    G: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    """Flash-attention over the paged cache for one tile of one row's new tokens and one K/V head.

    Args:
        Q: ``[tokens, n_heads, head_dim]`` packed queries (after RoPE).
        K, V: pools ``[num_blocks, block_size, n_kv_heads, head_dim]``, addressed by flat slot.
        OUT: ``[tokens, n_heads, head_dim]`` output, same layout as Q.
        BLOCK_TABLE: ``[rows, max_blocks]`` int32 block ids.
        TILES: ``[n_tiles, 3]`` int32 (row, first packed token, token count); one per program.
        POSITIONS: ``[tokens]`` int32 absolute position of each packed token.
        stride_*: element strides (token and head of Q/OUT, slot and head of K/V, table row).
        scale: softmax scale. window: sliding window W (keys above pos − W), read if HAS_WINDOW.
        head_dim, block_size: D and tokens per cache block.
        G: query heads per K/V head. BM: query rows per program (tokens × G, padded to a power of
        two ≥ 16). BN: keys per step. BD: head_dim padded to a power of two.
        DOT_FP32: cast dot operands to fp32 (interpreter). PRECISION: tl.dot input precision.
    """
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.load(TILES + tile * 3).to(tl.int64)
    first = tl.load(TILES + tile * 3 + 1)
    count = tl.load(TILES + tile * 3 + 2)

    m = tl.arange(0, BM)
    token = m // G
    head = kv_head * G + m % G
    valid_m = token < count
    d = tl.arange(0, BD)
    d_mask = d < head_dim
    q_index = (first + token).to(tl.int64)
    pos = tl.load(POSITIONS + q_index, mask=valid_m, other=0)
    q = tl.load(
        Q + q_index[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=valid_m[:, None] & d_mask[None, :],
        other=0.0,
    )
    if DOT_FP32:  # the interpreter's bf16/fp16 dot is wrong (triton issue 11584)
        q = q.to(tl.float32)

    hi = tl.max(tl.where(valid_m, pos, 0), axis=0) + 1
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(tl.min(tl.where(valid_m, pos, hi), axis=0) - window + 1, 0)
    m_i = tl.full((BM,), -1e30, tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    table_row = BLOCK_TABLE + row * stride_table
    for start in range(lo, hi, BN):
        n = start + tl.arange(0, BN)
        valid_n = n < hi
        block = tl.load(table_row + n // block_size, mask=valid_n, other=0).to(tl.int64)
        slot = block * block_size + n % block_size
        kv_mask = valid_n[:, None] & d_mask[None, :]
        k = tl.load(K + slot[:, None] * stride_kslot + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + slot[:, None] * stride_vslot + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        allowed = valid_n[None, :] & (n[None, :] <= pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (n[None, :] > pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        OUT + q_index[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=valid_m[:, None] & d_mask[None, :],
    )


def attention_warps(block_m: int, block_d: int) -> int:
    """Warps per program: the fp32 accumulator and the score tile must fit in registers
    (4 warps spill at 128 query rows × 128 dims on sm_90; see benchmarks/kernel_resources.py)."""
    return 8 if block_m * block_d >= 128 * 128 else 4


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
) -> torch.Tensor:
    """Attention output ``[tokens, n_heads, head_dim]`` of the packed new tokens over the cache.

    The new tokens' own K/V must already be in the cache (``PagedKVCache.write``). ``impl``:
    ``"triton"``, ``"torch"`` or ``"auto"`` (triton on CUDA, torch elsewhere).
    """
    tokens, n_heads, head_dim = query.shape
    n_kv_heads = key_cache.shape[2]
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} K/V heads evenly")
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {key_cache.shape[3]}")
    if tokens != layout.num_tokens:
        raise ValueError(f"query has {tokens} tokens but the layout describes {layout.num_tokens}")
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
    group = n_heads // n_kv_heads
    k_flat = key_cache.view(-1, n_kv_heads, head_dim)
    v_flat = value_cache.view(-1, n_kv_heads, head_dim)
    query = query if query.stride(-1) == 1 else query.contiguous()
    block_m = max(_MIN_BLOCK_M, next_power_of_2(layout.block_q * group))
    block_d = next_power_of_2(head_dim)
    _paged_attention_kernel[(layout.tiles.shape[0], n_kv_heads)](
        query,
        k_flat,
        v_flat,
        out,
        block_table,
        layout.tiles,
        layout.positions,
        query.stride(0),
        query.stride(1),
        k_flat.stride(0),
        k_flat.stride(1),
        v_flat.stride(0),
        v_flat.stride(1),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        scale,
        sliding_window or 0,
        head_dim,
        key_cache.shape[1],
        G=group,
        HAS_WINDOW=sliding_window is not None,
        DOT_FP32=triton_interpreting(),
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        BM=block_m,
        BN=_BLOCK_N,
        BD=block_d,
        num_warps=attention_warps(block_m, block_d),
    )
    return out


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
