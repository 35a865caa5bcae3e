"""Triton kernels of the paged attention (``paged_attention.py`` plans and launches them).

``_paged_attention_kernel``: one program per (tile of a row's new tokens, K/V head) over the whole
context the tile sees. ``_paged_attention_split_kernel``: one program per (chunk of a tile's keys,
K/V head), writing an fp32 partial output and log-sum-exp; ``_merge_splits_kernel`` merges a
token's chunks. Both attention kernels share the query load and the online-softmax loop.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_queries(
    Q,
    POSITIONS,
    first,
    count,
    kv_head,
    stride_qt,
    stride_qh,
    head_dim,
    G: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    """The tile's query rows (row m = token m // G, head ``kv_head * G + m % G``): the queries
    ``[BM, BD]``, their positions, packed token indices, heads and validity."""
    m = tl.arange(0, BM)
    token = m // G
    head = kv_head * G + m % G
    valid_m = token < count
    d = tl.arange(0, BD)
    q_index = (first + token).to(tl.int64)
    pos = tl.load(POSITIONS + q_index, mask=valid_m, other=0)
    q = tl.load(
        Q + q_index[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=valid_m[:, None] & (d < head_dim)[None, :],
        other=0.0,
    )
    if DOT_FP32:  # the interpreter's bf16/fp16 dot is wrong (triton issue 11584)
        q = q.to(tl.float32)
    return q, pos, q_index, token, head, valid_m


@triton.jit
def _attend_keys(
    q,
    pos,
    valid_m,
    K,
    V,
    table_row,
    kv_head,
    lo,
    hi,
    stride_kslot,
    stride_kh,
    stride_vslot,
    stride_vh,
    scale,
    window,
    head_dim,
    block_size,
    HAS_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    """Online softmax of the query rows over keys ``lo .. hi − 1`` of one row and K/V head:
    (unnormalised output ``[BM, BD]``, running max, running sum); a query row that may see none of
    these keys ends with sum 0 and output 0."""
    d = tl.arange(0, BD)
    d_mask = d < head_dim
    m_i = tl.full((BM,), -1e30, tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
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
    return acc, m_i, l_i


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
    """Flash-attention over the paged cache for one tile of one row's new tokens and one K/V head,
    over the whole context the tile sees.

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
    q, pos, q_index, token, head, valid_m = _tile_queries(
        Q, POSITIONS, first, count, kv_head, stride_qt, stride_qh, head_dim, G, DOT_FP32, BM, BD
    )
    hi = tl.max(tl.where(valid_m, pos, 0), axis=0) + 1
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(tl.min(tl.where(valid_m, pos, hi), axis=0) - window + 1, 0)
    acc, m_i, l_i = _attend_keys(
        q,
        pos,
        valid_m,
        K,
        V,
        BLOCK_TABLE + row * stride_table,
        kv_head,
        lo,
        hi,
        stride_kslot,
        stride_kh,
        stride_vslot,
        stride_vh,
        scale,
        window,
        head_dim,
        block_size,
        HAS_WINDOW,
        DOT_FP32,
        PRECISION,
        BM,
        BN,
        BD,
    )
    d = tl.arange(0, BD)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        OUT + q_index[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=valid_m[:, None] & (d < head_dim)[None, :],
    )


@triton.jit
def _paged_attention_split_kernel(
    Q,
    K,
    V,
    PART_OUT,
    PART_LSE,
    BLOCK_TABLE,
    TILES,
    POSITIONS,
    WORK,
    stride_qt,
    stride_qh,
    stride_kslot,
    stride_kh,
    stride_vslot,
    stride_vh,
    stride_table,
    n_heads,
    block_q,
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
    """One chunk of one tile's keys and one K/V head: the tile's normalised partial output and its
    log-sum-exp over the chunk, for ``_merge_splits_kernel``.

    Args (those not listed are ``_paged_attention_kernel``'s, which has OUT and its strides where
    this kernel has the partials; TILES is indexed by WORK's tile here):
        PART_OUT: ``[n_work, block_q, n_heads, head_dim]`` fp32 partial outputs (contiguous),
            softmax-normalised within the chunk; 0 for a query that sees none of its keys.
        PART_LSE: ``[n_work, block_q, n_heads]`` fp32 log-sum-exp of the scaled scores over the
            chunk (contiguous); -inf for a query that sees none of its keys.
        WORK: ``[n_work, 3]`` int32 (tile, first key, end key) of each chunk; one per program.
        n_heads, block_q: query heads, and tokens per tile (the partials' middle dimensions).
    """
    work = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.load(WORK + work * 3)
    key_lo = tl.load(WORK + work * 3 + 1)
    key_hi = tl.load(WORK + work * 3 + 2)
    row = tl.load(TILES + tile * 3).to(tl.int64)
    first = tl.load(TILES + tile * 3 + 1)
    count = tl.load(TILES + tile * 3 + 2)
    q, pos, q_index, token, head, valid_m = _tile_queries(
        Q, POSITIONS, first, count, kv_head, stride_qt, stride_qh, head_dim, G, DOT_FP32, BM, BD
    )
    acc, m_i, l_i = _attend_keys(
        q,
        pos,
        valid_m,
        K,
        V,
        BLOCK_TABLE + row * stride_table,
        kv_head,
        key_lo,
        key_hi,
        stride_kslot,
        stride_kh,
        stride_vslot,
        stride_vh,
        scale,
        window,
        head_dim,
        block_size,
        HAS_WINDOW,
        DOT_FP32,
        PRECISION,
        BM,
        BN,
        BD,
    )
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = (work.to(tl.int64) * block_q + token) * n_heads + head
    d = tl.arange(0, BD)
    tl.store(PART_LSE + part, lse, mask=valid_m)
    tl.store(PART_OUT + part[:, None] * head_dim + d[None, :], out, mask=valid_m[:, None] & (d < head_dim)[None, :])


@triton.jit
def _merge_splits_kernel(
    PART_OUT,
    PART_LSE,
    TOKEN_SPLITS,
    OUT,
    stride_ot,
    stride_oh,
    n_heads,
    block_q,
    head_dim,
    BS: tl.constexpr,
    BD: tl.constexpr,
):
    """One token and query head: its output from its tile's chunk partials, weighted by
    ``exp(lse − max lse)`` (exact: the chunks partition the keys the token may see).

    Args:
        PART_OUT, PART_LSE: ``_paged_attention_split_kernel``'s partials.
        TOKEN_SPLITS: ``[tokens, 3]`` int32 (first chunk of the token's tile, its chunk count, the
            token's index within the tile).
        OUT: ``[tokens, n_heads, head_dim]`` output.
        stride_ot, stride_oh: element strides of OUT's token and head.
        n_heads, block_q, head_dim: the partials' dimensions.
        BS: chunks merged per step. BD: head_dim padded to a power of two.
    """
    t = tl.program_id(0)
    head = tl.program_id(1)
    first = tl.load(TOKEN_SPLITS + t * 3)
    splits = tl.load(TOKEN_SPLITS + t * 3 + 1)
    index = tl.load(TOKEN_SPLITS + t * 3 + 2)
    d = tl.arange(0, BD)
    d_mask = d < head_dim
    m = tl.full((), -1e30, tl.float32)  # finite, so a chunk with lse -inf weighs exp(-inf) = 0
    total = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((BD,), dtype=tl.float32)
    for s0 in range(0, splits, BS):
        s = s0 + tl.arange(0, BS)
        valid_s = s < splits
        part = ((first + s).to(tl.int64) * block_q + index) * n_heads + head
        lse = tl.load(PART_LSE + part, mask=valid_s, other=float("-inf"))
        o = tl.load(
            PART_OUT + part[:, None] * head_dim + d[None, :], mask=valid_s[:, None] & d_mask[None, :], other=0.0
        )
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        alpha = tl.exp(m - m_new)
        weight = tl.exp(lse - m_new)
        total = total * alpha + tl.sum(weight, axis=0)
        acc = acc * alpha + tl.sum(weight[:, None] * o, axis=0)
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(OUT + t.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d_mask)


def attention_warps(block_m: int, block_d: int) -> int:
    """Warps per program: the fp32 accumulator and the score tile must fit in registers
    (4 warps spill at 128 query rows × 128 dims on sm_90; see benchmarks/kernel_resources.py)."""
    return 8 if block_m * block_d >= 128 * 128 else 4
