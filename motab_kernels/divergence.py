"""Fused LM-head + divergence + boundary: Triton kernels, host functions and autograd.

``fused_linear_divergence`` computes, for every row i, a divergence between the teacher's and the
student's next-token distributions from the two models' final hidden states and LM heads, without
ever holding ``[N, V]`` logits, probabilities or gradients. Rows are processed in chunks: the two
logit GEMMs of a chunk run on cuBLAS into a bounded ``[chunk, V]`` fp32 buffer, one Triton kernel
per chunk reads it row by row (online log-sum-exp, divergence, monitoring statistics and, when a
gradient is needed, the gradient w.r.t. the student logits), and two more GEMMs multiply that
gradient straight into ``d hidden`` and an fp32 ``d weight`` accumulator. Nothing is recomputed in
backward: with a reduced loss, the gradients are formed during forward and backward only scales
them by the incoming scalar (benchmarks/NOTES.md has the cost model behind this choice).
Forward-only fkl/rkl calls (monitoring) skip the buffer: one fused kernel forms the logit tiles
with tensor-core dots and reduces them in registers.

Math per row (s, t: transformed student / teacher logits, q = softmax(s), p = softmax(t)):

- ``fkl``  KL(p‖q) = Σ p·(log p − log q);        d/ds = q − p
- ``rkl``  KL(q‖p) = Σ q·(log q − log p);        d/ds = q·(log q − log p − KL(q‖p))
- ``jsd``  β·KL(p‖M) + (1−β)·KL(q‖M), M = β·p + (1−β)·q (TRL's generalized JSD);
           d/ds = (1−β)·q·(log q − log M − KL(q‖M)); β=0 is ``fkl`` and β=1 is ``rkl``, as in TRL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

from motab_kernels import reference
from motab_kernels._runtime import (
    addmm_wide_,
    matmul_wide,
    next_power_of_2,
    triton_interpreting,
    triton_usable_on,
)

KINDS = ("fkl", "rkl", "jsd")
IMPLS = ("auto", "triton", "chunked", "reference")
REDUCTIONS = ("none", "sum", "mean")

# Kernel-side divergence codes; "jsd" with β ∈ {0, 1} is mapped to the two KLs before launch.
_FKL, _RKL, _MIXTURE = 0, 1, 2

# Scratch budget of one chunk of rows. The triton path holds per logit element fp32 student and
# teacher logits plus a gradient tile (≤ 10 bytes); the chunked path about eight fp32 temporaries
# (logits, log-probs, probabilities, the mixture and its products). 768 MiB keeps scratch under
# the 1 GB target at a 152k vocabulary while still giving chunks of ~500 rows, large enough for
# the logit GEMMs to stay compute-bound (each chunk re-reads both weight matrices).
_CHUNK_BUDGET_BYTES = 768 << 20
_TRITON_BYTES_PER_LOGIT = 10
_CHUNKED_BYTES_PER_LOGIT = 32
# Chunks are rounded to a multiple of this so the GEMMs see tile-friendly row counts.
_CHUNK_ROW_MULTIPLE = 32


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # Portable tanh (no libdevice): an odd Taylor polynomial below |x| = 0.1, where the exp form
    # would lose relative precision to cancellation (its next term is < 1e-11 there), and
    # (1 − e^(−2|x|)) / (1 + e^(−2|x|)) above, which never overflows.
    ax = tl.abs(x)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    e = tl.exp(-2.0 * ax)
    large = (1.0 - e) / (1.0 + e)
    return tl.where(ax < 0.1, small, tl.where(x < 0.0, -large, large))


@triton.jit
def _transform(x, scale, cap, inv_temp, HAS_CAP: tl.constexpr):
    x = x * scale
    if HAS_CAP:
        x = cap * _tanh(x / cap)
    return x * inv_temp


@triton.jit
def _transform_slope(x, scale, cap, inv_temp, HAS_CAP: tl.constexpr):
    slope = scale * inv_temp
    if HAS_CAP:
        th = _tanh(x * scale / cap)
        slope = slope * (1.0 - th * th)
    return slope


@triton.jit
def _log1p(x):
    # Goldberg's correction: log(1 + x) to full relative precision for small x, with only log.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    return hi + _log1p(tl.exp(tl.minimum(a, b) - hi))


@triton.jit
def _divergence_rows_kernel(
    S,
    T,
    G,
    TARGET,
    ROW_SCALE,
    DIV,
    S_LOGP,
    T_LOGP,
    T_RANK,
    T_ENT,
    V,
    stride_s,
    stride_t,
    stride_g,
    s_scale,
    t_scale,
    s_cap,
    t_cap,
    inv_temp,
    beta,
    KIND: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    S_HAS_CAP: tl.constexpr,
    T_HAS_CAP: tl.constexpr,
    BV: tl.constexpr,
):
    """Divergence, monitoring statistics and student-logit gradient of one row per program.

    Args:
        S: raw student logits ``[C, V]`` (any float dtype, last dim contiguous), before transform.
        T: raw teacher logits ``[C, V]``, same layout rules as ``S``.
        G: output ``[C, V]`` gradient of ``ROW_SCALE[i] · div_i`` w.r.t. the raw student logits,
            stored in G's dtype; may alias ``S`` (each element is read before it is overwritten).
            Only touched when ``WANT_GRAD``.
        TARGET: ``[C]`` int64 token ids, already clamped into ``[0, V)``; read when ``HAS_TARGET``.
        ROW_SCALE: ``[C]`` fp32 factor of each row's divergence in the loss; read when ``WANT_GRAD``.
        DIV: output ``[C]`` fp32 divergence per row.
        S_LOGP, T_LOGP: outputs ``[C]`` fp32 log q[target], log p[target] (``HAS_TARGET``).
        T_RANK: output ``[C]`` int32, number of entries whose teacher logit exceeds the target's.
        T_ENT: output ``[C]`` fp32 teacher entropy.
        V: vocabulary size.
        stride_s, stride_t, stride_g: row strides of S, T, G in elements.
        s_scale, t_scale: logit scales applied first.
        s_cap, t_cap: soft-caps (``cap·tanh(x/cap)``), used when ``S_HAS_CAP`` / ``T_HAS_CAP``.
        inv_temp: 1 / temperature, applied last.
        beta: JSD mixture weight of the teacher, strictly inside (0, 1) when ``KIND`` is mixture.
        KIND: 0 forward KL, 1 reverse KL, 2 generalized JSD.
        BV: vocabulary tile width.
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    cols = tl.arange(0, BV)

    t_target = 0.0
    s_target = 0.0
    if HAS_TARGET:
        target = tl.load(TARGET + row)
        s_target = _transform(tl.load(s_row + target).to(tl.float32), s_scale, s_cap, inv_temp, S_HAS_CAP)
        t_target = _transform(tl.load(t_row + target).to(tl.float32), t_scale, t_cap, inv_temp, T_HAS_CAP)

    # Pass 1: online log-sum-exp of both rows. A finite start (not -inf) keeps the rescaling of
    # the entropy accumulator free of inf·0 on the first tile.
    m_s = -1e30
    z_s = 0.0
    m_t = -1e30
    z_t = 0.0
    cross = 0.0  # fkl: Σ e^(t−m_t)·(t−s);  rkl: Σ e^(s−m_s)·(s−t)
    ent = 0.0  # Σ e^(t−m_t)·(t−m_t), so that H(p) = log z_t − ent / z_t without cancellation
    rank = 0
    for start in range(0, V, BV):
        idx = start + cols
        mask = idx < V
        # Masked lanes hold finite values (other=0) and are zeroed by the where()s, so no inf−inf
        # is ever formed.
        s = _transform(tl.load(s_row + idx, mask=mask, other=0.0).to(tl.float32), s_scale, s_cap, inv_temp, S_HAS_CAP)
        t = _transform(tl.load(t_row + idx, mask=mask, other=0.0).to(tl.float32), t_scale, t_cap, inv_temp, T_HAS_CAP)
        m_s_new = tl.maximum(m_s, tl.max(tl.where(mask, s, float("-inf")), axis=0))
        m_t_new = tl.maximum(m_t, tl.max(tl.where(mask, t, float("-inf")), axis=0))
        alpha_s = tl.exp(m_s - m_s_new)
        alpha_t = tl.exp(m_t - m_t_new)
        e_s = tl.where(mask, tl.exp(s - m_s_new), 0.0)
        e_t = tl.where(mask, tl.exp(t - m_t_new), 0.0)
        t_minus_s = t - s
        if KIND == 0:
            cross = cross * alpha_t + tl.sum(e_t * t_minus_s, axis=0)
        if KIND == 1:
            cross = cross * alpha_s - tl.sum(e_s * t_minus_s, axis=0)
        ent = alpha_t * (ent + (m_t - m_t_new) * z_t) + tl.sum(e_t * (t - m_t_new), axis=0)
        z_s = z_s * alpha_s + tl.sum(e_s, axis=0)
        z_t = z_t * alpha_t + tl.sum(e_t, axis=0)
        m_s = m_s_new
        m_t = m_t_new
        if HAS_TARGET:
            rank += tl.sum((mask & (t > t_target)).to(tl.int32), axis=0)

    # Log-probabilities are formed as (x − m) − log z, never x − (m + log z): the rounding of
    # m + log z at |m| ≫ 1 would shift every log-probability (and normalise q to 1 + O(ulp(m))).
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    log_beta = tl.log(beta)
    log_1m_beta = tl.log(1.0 - beta)
    kl_q_mix = 0.0
    if KIND == 0:
        div = cross / z_t + ((m_s - m_t) + (log_z_s - log_z_t))
    elif KIND == 1:
        div = cross / z_s + ((m_t - m_s) + (log_z_t - log_z_s))
    else:
        # Pass 2 (JSD only): the mixture needs both normalisers before any term can be formed.
        kl_p_mix = 0.0
        for start in range(0, V, BV):
            idx = start + cols
            mask = idx < V
            s = _transform(
                tl.load(s_row + idx, mask=mask, other=0.0).to(tl.float32), s_scale, s_cap, inv_temp, S_HAS_CAP
            )
            t = _transform(
                tl.load(t_row + idx, mask=mask, other=0.0).to(tl.float32), t_scale, t_cap, inv_temp, T_HAS_CAP
            )
            ls = (s - m_s) - log_z_s
            lt = (t - m_t) - log_z_t
            lm = _logaddexp(ls + log_1m_beta, lt + log_beta)
            kl_p_mix += tl.sum(tl.where(mask, tl.exp(lt) * (lt - lm), 0.0), axis=0)
            kl_q_mix += tl.sum(tl.where(mask, tl.exp(ls) * (ls - lm), 0.0), axis=0)
        div = beta * kl_p_mix + (1.0 - beta) * kl_q_mix

    tl.store(DIV + row, div)
    tl.store(T_ENT + row, tl.log(z_t) - ent / z_t)
    if HAS_TARGET:
        tl.store(S_LOGP + row, (s_target - m_s) - log_z_s)
        tl.store(T_LOGP + row, (t_target - m_t) - log_z_t)
        tl.store(T_RANK + row, rank)

    if WANT_GRAD:
        row_scale = tl.load(ROW_SCALE + row)
        g_row = G + row * stride_g
        for start in range(0, V, BV):
            idx = start + cols
            mask = idx < V
            s_raw = tl.load(s_row + idx, mask=mask, other=0.0).to(tl.float32)
            s = _transform(s_raw, s_scale, s_cap, inv_temp, S_HAS_CAP)
            t = _transform(
                tl.load(t_row + idx, mask=mask, other=0.0).to(tl.float32), t_scale, t_cap, inv_temp, T_HAS_CAP
            )
            ls = (s - m_s) - log_z_s
            lt = (t - m_t) - log_z_t
            q = tl.exp(ls)
            if KIND == 0:
                g = q - tl.exp(lt)
            elif KIND == 1:
                g = q * (ls - lt - div)
            else:
                lm = _logaddexp(ls + log_1m_beta, lt + log_beta)
                g = (1.0 - beta) * q * (ls - lm - kl_q_mix)
            g = g * (row_scale * _transform_slope(s_raw, s_scale, s_cap, inv_temp, S_HAS_CAP))
            g = tl.where(row_scale != 0.0, g, 0.0)  # ignored rows may hold garbage (padding)
            tl.store(g_row + idx, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _logit_tile(
    H,
    W,
    B,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
):
    """fp32 ``[BM, BV]`` tile of ``H[rows] @ W[cols].T (+ B[cols])``, accumulated over D in BK steps."""
    acc = tl.zeros((BM, BV), dtype=tl.float32)
    ks = tl.arange(0, BK)
    h_ptrs = H + rows[:, None].to(tl.int64) * stride_h + ks[None, :]
    w_ptrs = W + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    for k in range(0, D, BK):
        k_mask = (k + ks) < D
        h = tl.load(h_ptrs + k, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_FP32:  # the interpreter's bf16/fp16 dot is wrong (triton issue 11584)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fused_monitor_kernel(
    HS,
    WS,
    BS,
    HT,
    WT,
    BT,
    TARGET,
    T_TARGET,
    PART,
    PART_RANK,
    N,
    V,
    DS,
    DT,
    SPLITS,
    stride_hs,
    stride_ws,
    stride_ht,
    stride_wt,
    s_scale,
    t_scale,
    s_cap,
    t_cap,
    inv_temp,
    N_BUCKET,
    KIND: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    S_HAS_CAP: tl.constexpr,
    T_HAS_CAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
):
    """Forward-only fkl/rkl + statistics straight from hidden states: the logit tiles live only in
    registers. Program (i, j) covers rows ``[i·BM, (i+1)·BM)`` and the j-th of ``SPLITS`` equal
    runs of vocabulary tiles, and writes that run's online-softmax partials; the host combines the
    runs. Row blocks vary fastest across programs, so the programs running together share a
    weight slice in L2 and each weight byte comes from memory about once.

    Args:
        HS, HT: ``[N, DS]`` / ``[N, DT]`` hidden states (last dim contiguous).
        WS, WT: ``[V, DS]`` / ``[V, DT]`` LM-head weights (last dim contiguous), same dtype as H*.
        BS, BT: ``[V]`` biases, read when ``HAS_BS`` / ``HAS_BT``.
        TARGET: ``[N]`` int64 target ids, clamped into ``[0, V)`` (``HAS_TARGET``).
        T_TARGET: ``[N]`` fp32 transformed teacher logit of each row's target (``HAS_TARGET``).
        PART: ``[N, SPLITS, 6]`` fp32 output: max and sum of exp for student and teacher, the
            cross term (fkl: Σ e^(t−m_t)(t−s); rkl: Σ e^(s−m_s)(s−t)) and Σ e^(t−m_t)(t−m_t).
        PART_RANK: ``[N, SPLITS]`` int32 output: entries other than the target scored above it.
        N, V, DS, DT: rows, vocabulary, hidden sizes. SPLITS: vocabulary runs (grid axis 1).
        stride_*: row strides in elements.
        s_scale, t_scale, s_cap, t_cap, inv_temp: logit transform, as in the row kernel.
        N_BUCKET: N rounded up to a power of two, only an autotuning key.
        KIND: 0 forward KL, 1 reverse KL.
        DOT_FP32: cast dot operands to fp32 (interpreter). PRECISION: ``tl.dot`` input precision.
        BM, BV, BK: tile sizes over rows, vocabulary and hidden dimension.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < N
    num_tiles = tl.cdiv(V, BV)
    per_split = tl.cdiv(num_tiles, SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, num_tiles)
    t_target = tl.zeros((BM,), dtype=tl.float32)
    targets = tl.zeros((BM,), dtype=tl.int64)
    if HAS_TARGET:
        targets = tl.load(TARGET + rows, mask=row_mask, other=0)
        t_target = tl.load(T_TARGET + rows, mask=row_mask, other=0.0)

    m_s = tl.full((BM,), -1e30, tl.float32)
    z_s = tl.zeros((BM,), dtype=tl.float32)
    m_t = tl.full((BM,), -1e30, tl.float32)
    z_t = tl.zeros((BM,), dtype=tl.float32)
    cross = tl.zeros((BM,), dtype=tl.float32)
    ent = tl.zeros((BM,), dtype=tl.float32)
    rank = tl.zeros((BM,), dtype=tl.int32)
    for tile in range(first, last):
        cols = tile * BV + tl.arange(0, BV)
        col_mask = cols < V
        # The student's statistics are folded in before the teacher tile exists, so fewer
        # [BM, BV] tiles are live at once (registers decide how many programs share an SM).
        valid = col_mask[None, :]
        s = _logit_tile(
            HS,
            WS,
            BS,
            rows,
            cols,
            row_mask,
            col_mask,
            DS,
            stride_hs,
            stride_ws,
            HAS_BS,
            DOT_FP32,
            PRECISION,
            BM,
            BV,
            BK,
        )
        s = tl.where(valid, _transform(s, s_scale, s_cap, inv_temp, S_HAS_CAP), float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
        alpha_s = tl.exp(m_s - m_s_new)
        e_s = tl.exp(s - m_s_new[:, None])
        z_s = z_s * alpha_s + tl.sum(e_s, axis=1)
        m_s = m_s_new
        t = _logit_tile(
            HT,
            WT,
            BT,
            rows,
            cols,
            row_mask,
            col_mask,
            DT,
            stride_ht,
            stride_wt,
            HAS_BT,
            DOT_FP32,
            PRECISION,
            BM,
            BV,
            BK,
        )
        t = tl.where(valid, _transform(t, t_scale, t_cap, inv_temp, T_HAS_CAP), float("-inf"))
        m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
        alpha_t = tl.exp(m_t - m_t_new)
        t_centered = t - m_t_new[:, None]
        e_t = tl.exp(t_centered)
        t_minus_s = tl.where(valid, t - s, 0.0)
        if KIND == 0:
            cross = cross * alpha_t + tl.sum(e_t * t_minus_s, axis=1)
        else:
            cross = cross * alpha_s - tl.sum(e_s * t_minus_s, axis=1)
        ent = alpha_t * (ent + (m_t - m_t_new) * z_t) + tl.sum(tl.where(valid, e_t * t_centered, 0.0), axis=1)
        z_t = z_t * alpha_t + tl.sum(e_t, axis=1)
        m_t = m_t_new
        if HAS_TARGET:
            # The target's own column is left out: its kernel logit may differ from the host's
            # dot product by a rounding step, and must not count as scoring above itself.
            above = (t > t_target[:, None]) & (cols[None, :] != targets[:, None])
            rank += tl.sum(above.to(tl.int32), axis=1)

    out = rows.to(tl.int64) * SPLITS + split
    tl.store(PART + out * 6, m_s, mask=row_mask)
    tl.store(PART + out * 6 + 1, z_s, mask=row_mask)
    tl.store(PART + out * 6 + 2, m_t, mask=row_mask)
    tl.store(PART + out * 6 + 3, z_t, mask=row_mask)
    tl.store(PART + out * 6 + 4, cross, mask=row_mask)
    tl.store(PART + out * 6 + 5, ent, mask=row_mask)
    tl.store(PART_RANK + out, rank, mask=row_mask)


# --------------------------------------------------------------------------------------------
# Settings and per-row outputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """Everything besides tensors that decides the math of a call."""

    kind: str  # "fkl", "rkl" or "jsd"; "jsd" only with 0 < beta < 1
    beta: float
    student: reference.LogitTransform
    teacher: reference.LogitTransform

    @property
    def kernel_kind(self) -> int:
        return {"fkl": _FKL, "rkl": _RKL, "jsd": _MIXTURE}[self.kind]


@dataclass(frozen=True)
class _PassOptions:
    """What a sweep over row chunks needs besides tensors."""

    settings: _Settings
    impl: str  # "triton" or "chunked"
    chunk_size: int | None
    stats_dtype: torch.dtype  # fp32, or fp64 for fp64 inputs


@dataclass
class _RowStats:
    """Per-row results of the row math, written chunk by chunk into ``[N]`` tensors."""

    divergence: torch.Tensor
    teacher_entropy: torch.Tensor
    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor
    teacher_rank: torch.Tensor

    @classmethod
    def empty(cls, n: int, device: torch.device, dtype: torch.dtype) -> _RowStats:
        def vec(dt: torch.dtype) -> torch.Tensor:
            return torch.empty(n, device=device, dtype=dt)

        return cls(vec(dtype), vec(dtype), vec(dtype), vec(dtype), vec(torch.int32))

    def rows(self, start: int, end: int) -> _RowStats:
        return _RowStats(*(getattr(self, f.name)[start:end] for f in fields(self)))

    def fill(self, divergence: torch.Tensor, stats: dict[str, torch.Tensor | None]) -> None:
        self.divergence.copy_(divergence)
        for name, value in stats.items():
            if value is not None:
                getattr(self, name).copy_(value)


def _rows_triton(
    s: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    settings: _Settings,
    out: _RowStats,
) -> None:
    """Launch the row kernel on one chunk: fills ``out`` and, with ``row_scale``, ``grad_out``."""
    s, t = _last_dim_contiguous(s), _last_dim_contiguous(t)
    rows, vocab = s.shape
    if rows == 0:
        return
    want_grad = row_scale is not None
    if want_grad:
        assert grad_out is not None and grad_out.stride(-1) == 1
    # 4k fp32 lanes (16 KiB per operand) on a GPU; under the interpreter 256, so that the test
    # vocabularies (~1000) cross several tiles and exercise the online rescaling.
    block_v = min(next_power_of_2(vocab), 256 if triton_interpreting() else 4096)
    dummy = out.divergence
    s_cap, t_cap = settings.student.softcap, settings.teacher.softcap
    _divergence_rows_kernel[(rows,)](
        s,
        t,
        grad_out if want_grad else dummy,
        target if target is not None else dummy,
        row_scale if want_grad else dummy,
        out.divergence,
        out.student_logprob,
        out.teacher_logprob,
        out.teacher_rank,
        out.teacher_entropy,
        vocab,
        s.stride(0),
        t.stride(0),
        grad_out.stride(0) if want_grad else 0,
        settings.student.scale,
        settings.teacher.scale,
        s_cap or 1.0,
        t_cap or 1.0,
        1.0 / settings.student.temperature,
        settings.beta,
        KIND=settings.kernel_kind,
        HAS_TARGET=target is not None,
        WANT_GRAD=want_grad,
        S_HAS_CAP=s_cap is not None,
        T_HAS_CAP=t_cap is not None,
        BV=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )


def _rows_chunked(
    s: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    settings: _Settings,
    out: _RowStats,
) -> None:
    """The same contract as ``_rows_triton`` in plain PyTorch, with the closed-form gradients of
    the module docstring (autograd through log-softmax would cost twice as much)."""
    dtype = out.divergence.dtype
    s_raw = s.to(dtype)
    s = settings.student.apply(s_raw)
    t = settings.teacher.apply(t.to(dtype))
    ls = torch.log_softmax(s, dim=-1)
    lt = torch.log_softmax(t, dim=-1)
    p = lt.exp()
    q = ls.exp() if settings.kind != "fkl" or row_scale is not None else None
    beta = settings.beta
    if settings.kind == "fkl":
        div = (p * (lt - ls)).sum(-1)
    elif settings.kind == "rkl":
        log_ratio = ls - lt
        div = (q * log_ratio).sum(-1)
    else:
        log_mix = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
        log_ratio = ls - log_mix
        kl_q_mix = (q * log_ratio).sum(-1)
        div = beta * (p * (lt - log_mix)).sum(-1) + (1.0 - beta) * kl_q_mix
    out.fill(div, reference.monitoring_statistics(ls, lt, t, target))
    if row_scale is None:
        return
    if settings.kind == "fkl":
        grad = q.sub_(p)
    elif settings.kind == "rkl":
        grad = q.mul_(log_ratio.sub_(div[:, None]))
    else:
        grad = q.mul_(log_ratio.sub_(kl_q_mix[:, None])).mul_(1.0 - beta)
    grad.mul_(row_scale.to(dtype)[:, None]).mul_(settings.student.slope(s_raw))
    grad_out.copy_(grad.masked_fill_(row_scale[:, None] == 0, 0.0))  # ignored rows may hold garbage


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------------------------
# Chunk loops over the two kinds of input (hidden states + LM heads, or logits in memory)
# --------------------------------------------------------------------------------------------


def _chunk_rows(n: int, vocab: int, impl: str, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else equal chunks within the scratch budget (a
    short last chunk would pay a full read of both weight matrices for few rows)."""
    if chunk_size is not None:
        return chunk_size
    per_row = vocab * (_TRITON_BYTES_PER_LOGIT if impl == "triton" else _CHUNKED_BYTES_PER_LOGIT)
    budget_rows = max(_CHUNK_BUDGET_BYTES // per_row, 1)
    rows = triton.cdiv(n, triton.cdiv(n, budget_rows))
    rounded = triton.cdiv(rows, _CHUNK_ROW_MULTIPLE) * _CHUNK_ROW_MULTIPLE
    return max(min(rounded if rounded <= budget_rows else rows, n), 1)


def _run_rows(impl: str, *args, **kwargs) -> None:
    (_rows_triton if impl == "triton" else _rows_chunked)(*args, **kwargs)


@torch.no_grad()
def _linear_pass(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    ht: torch.Tensor,
    wt: torch.Tensor,
    bt: torch.Tensor | None,
    target: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    opts: _PassOptions,
) -> tuple[_RowStats, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
    """One sweep over row chunks: per-row results and, with ``row_scale``, the student gradients
    (hidden in its dtype; weight and bias as fp32 accumulators)."""
    n, vocab = hs.shape[0], ws.shape[0]
    out = _RowStats.empty(n, hs.device, opts.stats_dtype)
    grads = None
    if row_scale is not None:
        grads = (
            torch.empty_like(hs),
            torch.zeros(ws.shape, device=ws.device, dtype=opts.stats_dtype),
            torch.zeros(vocab, device=ws.device, dtype=opts.stats_dtype) if bs is not None else None,
        )
    chunk = _chunk_rows(n, vocab, opts.impl, opts.chunk_size)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_s = hs[start:end]
        s = _chunk_logits(h_s, ws, bs)
        t = _chunk_logits(ht[start:end], wt, bt)
        grad_logits = None
        if grads is not None:
            # The gradient overwrites the student logits in place when both are fp32.
            grad_logits = s if ws.dtype == s.dtype else torch.empty(s.shape, device=s.device, dtype=ws.dtype)
        _run_rows(
            opts.impl,
            s,
            t,
            None if target is None else target[start:end],
            None if row_scale is None else row_scale[start:end],
            grad_logits,
            opts.settings,
            out.rows(start, end),
        )
        if grads is not None:
            grad_hs, grad_ws, grad_bs = grads
            grad_hs[start:end] = grad_logits @ ws
            # Rows without loss get zero gradient logits, but 0·NaN is NaN: padding rows whose
            # hidden states are garbage must not reach the weight gradient.
            h_s = torch.where(row_scale[start:end, None] != 0, h_s, 0.0)
            addmm_wide_(grad_ws, grad_logits.t(), h_s)
            if grad_bs is not None:
                grad_bs += grad_logits.sum(0, dtype=grad_bs.dtype)
    return out, grads


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = matmul_wide(hidden, weight.t())
    if bias is not None:
        logits += bias.to(logits.dtype)
    return logits


@torch.no_grad()
def _logits_pass(
    s: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    opts: _PassOptions,
) -> tuple[_RowStats, torch.Tensor | None]:
    """One sweep over row chunks of logits already in memory; with ``row_scale``, also the
    gradient w.r.t. the student logits (in their dtype)."""
    n, vocab = s.shape
    out = _RowStats.empty(n, s.device, opts.stats_dtype)
    grad = torch.empty_like(s) if row_scale is not None else None
    chunk = _chunk_rows(n, vocab, opts.impl, opts.chunk_size)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        _run_rows(
            opts.impl,
            s[start:end],
            t[start:end],
            None if target is None else target[start:end],
            None if row_scale is None else row_scale[start:end],
            None if grad is None else grad[start:end],
            opts.settings,
            out.rows(start, end),
        )
    return out, grad


# Forward-only monitoring of these kinds runs the fully fused kernel (logit tiles never leave
# registers, so its floor is the GEMMs themselves); JSD needs both normalisers before any of its
# terms, so without a gradient it keeps the buffered path.
FUSED_MONITOR_KINDS = ("fkl", "rkl")
# Programs per SM the fused kernel aims for (counting 64-row blocks): enough waves that the last
# one's tail stays a small fraction of the run.
_MONITOR_WAVES = 8


def _monitor_configs() -> list[triton.Config]:
    # Tiles that compile without register spills on sm_90 for both kinds (see
    # benchmarks/kernel_resources.py); larger ones (128×128) spill: two fp32 tiles live at once.
    shapes = [(64, 64, 64, 8, 3), (64, 64, 128, 8, 3), (64, 128, 64, 8, 3)]
    return [triton.Config({"BM": bm, "BV": bv, "BK": bk}, num_warps=w, num_stages=st) for bm, bv, bk, w, st in shapes]


if triton_interpreting():
    # The interpreter runs one program at a time: small fixed tiles, no autotuning.
    _fused_monitor_launch = _fused_monitor_kernel
    _INTERPRETED_TILES = {"BM": 16, "BV": 64, "BK": 16}
else:
    _fused_monitor_launch = triton.autotune(configs=_monitor_configs(), key=["N_BUCKET", "V", "DS", "DT"])(
        _fused_monitor_kernel
    )
    _INTERPRETED_TILES = {}


@torch.no_grad()
def _fused_monitor(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    ht: torch.Tensor,
    wt: torch.Tensor,
    bt: torch.Tensor | None,
    target: torch.Tensor | None,
    settings: _Settings,
) -> _RowStats:
    """Per-row results of a forward-only fkl/rkl call, straight from hidden states and weights."""
    hs, ws, ht, wt = (_last_dim_contiguous(x) for x in (hs, ws, ht, wt))
    n, vocab = hs.shape[0], ws.shape[0]
    device = hs.device
    out = _RowStats.empty(n, device, torch.float32)
    if n == 0:
        return out
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(triton.cdiv(_MONITOR_WAVES * sms, triton.cdiv(n, 64)), triton.cdiv(vocab, 128)))
    else:
        splits = min(4, triton.cdiv(vocab, 64))
    part = torch.empty(n, splits, 6, device=device, dtype=torch.float32)
    part_rank = torch.empty(n, splits, device=device, dtype=torch.int32)
    s_target = t_target = None
    if target is not None:
        s_target = settings.student.apply(_target_logits(hs, ws, bs, target))
        t_target = settings.teacher.apply(_target_logits(ht, wt, bt, target))
    s_cap, t_cap = settings.student.softcap, settings.teacher.softcap
    _fused_monitor_launch[lambda meta: (triton.cdiv(n, meta["BM"]), splits)](
        hs,
        ws,
        bs if bs is not None else part,
        ht,
        wt,
        bt if bt is not None else part,
        target if target is not None else part_rank,
        t_target if t_target is not None else part,
        part,
        part_rank,
        n,
        vocab,
        hs.shape[1],
        ht.shape[1],
        splits,
        hs.stride(0),
        ws.stride(0),
        ht.stride(0),
        wt.stride(0),
        settings.student.scale,
        settings.teacher.scale,
        s_cap or 1.0,
        t_cap or 1.0,
        1.0 / settings.student.temperature,
        next_power_of_2(n),
        KIND=settings.kernel_kind,
        HAS_TARGET=target is not None,
        HAS_BS=bs is not None,
        HAS_BT=bt is not None,
        S_HAS_CAP=s_cap is not None,
        T_HAS_CAP=t_cap is not None,
        DOT_FP32=triton_interpreting(),
        PRECISION="ieee" if hs.dtype == torch.float32 else "tf32",
        **_INTERPRETED_TILES,
    )
    _combine_monitor_partials(part, part_rank, settings.kind, s_target, t_target, out)
    return out


def _target_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor):
    """Raw fp32 logit of each row's target: one dot product per row."""
    logits = (hidden.float() * weight[target].float()).sum(-1)
    return logits if bias is None else logits + bias[target].float()


def _combine_monitor_partials(part, part_rank, kind, s_target, t_target, out: _RowStats) -> None:
    """Merges the per-split online-softmax partials into per-row results (log-space, as the kernel)."""
    m_s, z_s, m_t, z_t, cross, ent = part.unbind(-1)
    top_s = m_s.amax(1, keepdim=True)
    top_t = m_t.amax(1, keepdim=True)
    w_s = torch.exp(m_s - top_s)
    w_t = torch.exp(m_t - top_t)
    log_z_s = torch.log((z_s * w_s).sum(1))
    log_z_t = torch.log((z_t * w_t).sum(1))
    top_s, top_t = top_s[:, 0], top_t[:, 0]
    if kind == "fkl":
        div = (cross * w_t).sum(1) / log_z_t.exp() + ((top_s - top_t) + (log_z_s - log_z_t))
    else:
        div = (cross * w_s).sum(1) / log_z_s.exp() + ((top_t - top_s) + (log_z_t - log_z_s))
    entropy_sum = (w_t * (ent + (m_t - top_t[:, None]) * z_t)).sum(1)
    stats = {"teacher_entropy": log_z_t - entropy_sum / log_z_t.exp()}
    if s_target is not None:
        stats["student_logprob"] = (s_target - top_s) - log_z_s
        stats["teacher_logprob"] = (t_target - top_t) - log_z_t
        stats["teacher_rank"] = part_rank.sum(1, dtype=torch.int32)
    out.fill(div, stats)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


def _weighted_loss(row_weight: torch.Tensor, divergence: torch.Tensor, reduce: bool) -> torch.Tensor:
    """Σ_i w_i·d_i, or the vector w_i·d_i. Rows of weight 0 (ignored rows) contribute exactly 0,
    even when their inputs are garbage (padding) and their divergence is NaN or inf."""
    weighted = torch.where(row_weight != 0, row_weight * divergence, 0.0)
    return weighted.sum() if reduce else weighted


def _loss_and_outputs(ctx, out: _RowStats, row_weight: torch.Tensor, reduce: bool) -> tuple[torch.Tensor, ...]:
    """What both autograd functions return: the loss, then the per-row results (not differentiable)."""
    per_row = tuple(getattr(out, f.name) for f in fields(out))
    ctx.mark_non_differentiable(*per_row)
    return (_weighted_loss(row_weight, out.divergence, reduce), *per_row)


class _LinearDivergenceFunction(torch.autograd.Function):
    """loss = Σ_i row_weight_i · div_i (reduced) or the vector row_weight · div (``none``).

    ``want_grad`` is decided by the caller (grad mode is off inside ``forward``). With a reduced
    loss the gradients are formed in forward and backward only scales them; with ``none`` the
    upstream gradient weighs each row, so backward runs the pass again.
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, target, row_weight, opts: _PassOptions, reduce: bool, want_grad: bool):
        eager = want_grad and reduce
        out, grads = _linear_pass(hs, ws, bs, ht, wt, bt, target, row_weight if eager else None, opts)
        ctx.opts, ctx.reduce = opts, reduce
        ctx.weight_dtypes = (ws.dtype, None if bs is None else bs.dtype)
        if eager:
            ctx.save_for_backward(*grads)
        elif want_grad:
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, target, row_weight)
        return _loss_and_outputs(ctx, out, row_weight, reduce)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if ctx.reduce:
            grad_hs, grad_ws, grad_bs = ctx.saved_tensors
            grad_hs = grad_hs * grad_loss.to(grad_hs.dtype)
            scale = grad_loss
        else:
            hs, ws, bs, ht, wt, bt, target, row_weight = ctx.saved_tensors
            _, (grad_hs, grad_ws, grad_bs) = _linear_pass(
                hs, ws, bs, ht, wt, bt, target, row_weight * grad_loss, ctx.opts
            )
            scale = None
        return (
            grad_hs,
            _scaled_copy(grad_ws, scale, ctx.weight_dtypes[0]),
            None if grad_bs is None else _scaled_copy(grad_bs, scale, ctx.weight_dtypes[1]),
        ) + (None,) * 8


def _scaled_copy(accumulator: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 accumulator as a fresh tensor of the parameter's dtype, times ``scale``; the cast
    comes first so no second fp32 copy of a weight-sized tensor is ever made."""
    grad = accumulator.to(dtype, copy=True)
    return grad if scale is None else grad.mul_(scale.to(dtype))


class _LogitDivergenceFunction(torch.autograd.Function):
    """The same contract as ``_LinearDivergenceFunction`` with logits given in memory."""

    @staticmethod
    def forward(ctx, s, t, target, row_weight, opts: _PassOptions, reduce: bool, want_grad: bool):
        eager = want_grad and reduce
        out, grad = _logits_pass(s, t, target, row_weight if eager else None, opts)
        ctx.opts, ctx.reduce = opts, reduce
        if eager:
            ctx.save_for_backward(grad)
        elif want_grad:
            ctx.save_for_backward(s, t, target, row_weight)
        return _loss_and_outputs(ctx, out, row_weight, reduce)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if ctx.reduce:
            (grad,) = ctx.saved_tensors
            grad = grad * grad_loss.to(grad.dtype)
        else:
            s, t, target, row_weight = ctx.saved_tensors
            _, grad = _logits_pass(s, t, target, row_weight * grad_loss, ctx.opts)
        return (grad,) + (None,) * 6


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass
class DivergenceOutput:
    """What ``fused_linear_divergence`` and ``logit_divergence`` return, all per row ``i`` of the
    flattened input (``N`` rows).

    Attributes:
        loss: the reduced loss (scalar), or ``[N]`` with ``reduction="none"``; the only
            differentiable output.
        per_token: ``[N]`` divergence of each row, unweighted; 0 for ignored rows.
        teacher_entropy: ``[N]`` entropy of the teacher's (tempered) distribution; NaN for ignored rows.
        student_logprob, teacher_logprob: ``[N]`` log q[target], log p[target]; NaN for ignored
            rows; ``None`` without ``target``.
        teacher_rank: ``[N]`` int32, how many vocabulary entries the teacher scores strictly above
            the target (0 = the teacher's top choice); -1 for ignored rows; ``None`` without target.
        stray: ``[N]`` bool, ``per_token > threshold`` on valid rows (``None`` without threshold).
        first_stray: ``[B]`` int64, per sequence, the index within the sequence of its first stray
            row; a sequence that never strays gets its length, so the value is always the number
            of rows to keep (``None`` without ``seq_len``).
    """

    loss: torch.Tensor
    per_token: torch.Tensor
    teacher_entropy: torch.Tensor
    student_logprob: torch.Tensor | None = None
    teacher_logprob: torch.Tensor | None = None
    teacher_rank: torch.Tensor | None = None
    stray: torch.Tensor | None = None
    first_stray: torch.Tensor | None = None


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    target: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    threshold: float | torch.Tensor | None = None,
    seq_len: int | torch.Tensor | list[int] | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_scale: float | tuple[float, float] = 1.0,
    softcap: float | tuple[float | None, float | None] | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> DivergenceOutput:
    """Divergence between teacher and student next-token distributions from hidden states.

    Logits are ``hidden @ weight.T + bias``, then multiplied by ``logit_scale``, soft-capped
    (``cap·tanh(x / cap)``) and divided by ``temperature`` (no T² factor is applied anywhere).
    Scale and cap take one value for both models or a ``(student, teacher)`` pair.

    Args:
        student_hidden: ``[..., Ds]`` final hidden states; row i predicts ``target[i]`` (the
            caller shifts). Leading dimensions are flattened into N rows.
        student_weight: ``[V, Ds]`` student LM head. Gets a gradient, as do hidden and bias.
        teacher_hidden: ``[..., Dt]`` with the same leading shape; treated as a constant.
        teacher_weight: ``[V, Dt]`` teacher LM head; V must equal the student's.
        kind: ``"fkl"`` KL(teacher‖student), ``"rkl"`` KL(student‖teacher) or ``"jsd"``,
            generalized JSD(β) as TRL's GKD computes it (β=0 is fkl, β=1 is rkl).
        beta: JSD weight of the teacher in the mixture, in [0, 1].
        target: ``[...]`` token ids; rows equal to ``ignore_index`` get no loss. Needed for the
            target statistics; ``None`` makes every row valid.
        reduction: ``"mean"`` = Σ_valid w_i·d_i / n_valid (n_valid = number of rows whose target
            is not ``ignore_index``, all rows without target; 0 when no row is valid),
            ``"sum"`` = Σ_valid w_i·d_i, ``"none"`` = the ``[N]`` vector w_i·d_i (0 on ignored rows).
        weights: optional ``[N]`` per-row weights w_i (1 by default).
        normalizer: with ``"mean"``, divide by this instead of n_valid (e.g. the number of
            valid tokens over all gradient-accumulation micro-batches).
        threshold: scalar or ``[N]`` boundary; ``stray = per_token > threshold`` on valid rows.
        seq_len: groups consecutive rows into sequences for ``first_stray``: an int k (N = B·k)
            or B lengths summing to N. Needs ``threshold``.
        impl: ``"triton"`` (CUDA; CPU only under ``TRITON_INTERPRET=1``), ``"chunked"`` (plain
            PyTorch over row chunks), ``"reference"`` (naive, materialises [N, V]) or ``"auto"``
            (triton on CUDA, chunked elsewhere; never a silent fallback).
        chunk_size: rows per chunk; by default as many as fit a 768 MiB scratch budget.

    Dtypes: the matmuls run in the weight's dtype (the hidden state is cast to it), or in the
    autocast dtype when autocast is on for the device, as ``F.linear`` would; logits, softmax
    and accumulators are fp32 (fp64 for fp64 inputs, chunked/reference only). Gradients come back
    in each input's own dtype; the weight gradient is accumulated over chunks in fp32.

    With a reduced loss and a student that requires grad, the gradients are computed during
    this call (nothing is recomputed in backward, which only scales them).
    """
    lead_shape = student_hidden.shape[:-1]
    _check_linear_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias)
    n, vocab = math.prod(lead_shape), student_weight.shape[0]
    dtype = _matmul_dtype(student_hidden, student_weight)
    teacher_dtype = _matmul_dtype(teacher_hidden, teacher_weight)
    hs = student_hidden.reshape(n, -1).to(dtype)
    ws = student_weight.to(dtype)
    ht = teacher_hidden.reshape(n, -1).to(teacher_dtype).detach()
    wt = teacher_weight.to(teacher_dtype).detach()
    bt = None if teacher_bias is None else teacher_bias.detach()
    call = _prepare_call(
        n,
        vocab,
        lead_shape,
        student_hidden.device,
        dtype,
        kind,
        beta,
        temperature,
        target,
        ignore_index,
        reduction,
        weights,
        normalizer,
        threshold,
        seq_len,
        logit_scale,
        softcap,
        impl,
    )
    want_grad = _grad_requested(hs, ws, student_bias)
    if call.impl == "reference":
        rows = call.valid[:, None]  # garbage in ignored rows would reach d weight through 0·NaN
        s = reference.linear_logits(torch.where(rows, hs, 0.0), ws, student_bias).to(call.stats_dtype)
        t = reference.linear_logits(torch.where(rows, ht, 0.0), wt, bt).to(call.stats_dtype)
        loss, out = _reference_rows(s, t, call)
    elif call.impl == "triton" and not want_grad and call.settings.kind in FUSED_MONITOR_KINDS:
        out = _fused_monitor(hs, ws, student_bias, ht, wt, bt, call.target, call.settings)
        loss = _weighted_loss(call.row_weight, out.divergence, call.reduce)
    else:
        loss, *stats = _LinearDivergenceFunction.apply(
            hs,
            ws,
            student_bias,
            ht,
            wt,
            bt,
            call.target,
            call.row_weight,
            call.pass_options(chunk_size),
            call.reduce,
            want_grad,
        )
        out = _RowStats(*stats)
    return _finish(loss, out, call)


def logit_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    target: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    threshold: float | torch.Tensor | None = None,
    seq_len: int | torch.Tensor | list[int] | None = None,
    logit_scale: float | tuple[float, float] = 1.0,
    softcap: float | tuple[float | None, float | None] | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> DivergenceOutput:
    """``fused_linear_divergence`` for ``[..., V]`` logits already in memory (the decode path,
    where the student's logits exist anyway for sampling). Same arguments and outputs; the
    gradient goes to ``student_logits``."""
    lead_shape = student_logits.shape[:-1]
    _check_logit_inputs(student_logits, teacher_logits)
    vocab = student_logits.shape[-1]
    n = math.prod(lead_shape)
    call = _prepare_call(
        n,
        vocab,
        lead_shape,
        student_logits.device,
        student_logits.dtype,
        kind,
        beta,
        temperature,
        target,
        ignore_index,
        reduction,
        weights,
        normalizer,
        threshold,
        seq_len,
        logit_scale,
        softcap,
        impl,
    )
    s = student_logits.reshape(n, vocab)
    t = teacher_logits.reshape(n, vocab).detach()
    if call.impl == "reference":
        loss, out = _reference_rows(s.to(call.stats_dtype), t.to(call.stats_dtype), call)
    else:
        loss, *stats = _LogitDivergenceFunction.apply(
            s, t, call.target, call.row_weight, call.pass_options(chunk_size), call.reduce, _grad_requested(s)
        )
        out = _RowStats(*stats)
    return _finish(loss, out, call)


def first_stray_index(stray: torch.Tensor, seq_len: int | torch.Tensor | list[int]) -> torch.Tensor:
    """Per sequence of consecutive rows, the index of its first ``True`` in ``stray``, or the
    sequence's length when it has none (= the number of rows before the first stray)."""
    n = stray.shape[0]
    if isinstance(seq_len, int):
        positions = torch.arange(seq_len, device=stray.device)
        return torch.where(stray.view(-1, seq_len), positions, seq_len).amin(dim=1)
    lengths = torch.as_tensor(seq_len, device=stray.device, dtype=torch.int64)
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=stray.device), lengths, output_size=n)
    starts = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(n, device=stray.device) - starts[sequence]
    candidate = torch.where(stray, position, lengths[sequence])
    return lengths.clone().scatter_reduce_(0, sequence, candidate, reduce="amin")


@dataclass
class _Call:
    """A validated call: settings, the impl chosen and the per-row tensors the passes need."""

    settings: _Settings
    impl: str
    target: torch.Tensor | None  # [N] int64 with ignored rows clamped to id 0
    valid: torch.Tensor  # [N] bool
    row_weight: torch.Tensor  # [N] factor of each row's divergence in the loss
    reduce: bool
    stats_dtype: torch.dtype
    threshold: float | torch.Tensor | None
    seq_len: int | torch.Tensor | list[int] | None

    def pass_options(self, chunk_size: int | None) -> _PassOptions:
        return _PassOptions(self.settings, self.impl, chunk_size, self.stats_dtype)


def _grad_requested(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def _prepare_call(
    n,
    vocab,
    lead_shape,
    device,
    dtype,
    kind,
    beta,
    temperature,
    target,
    ignore_index,
    reduction,
    weights,
    normalizer,
    threshold,
    seq_len,
    logit_scale,
    softcap,
    impl,
) -> _Call:
    settings = _settings(kind, beta, temperature, logit_scale, softcap)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if normalizer is not None and reduction != "mean":
        raise ValueError(
            f"normalizer replaces the denominator of reduction='mean'; it means nothing with reduction={reduction!r}"
        )
    impl = _resolve_impl(impl, device)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if impl == "triton" and stats_dtype == torch.float64:
        raise TypeError("impl='triton' computes in float32; use impl='chunked' or 'reference' for float64 inputs")
    if target is None:
        valid = torch.ones(n, dtype=torch.bool, device=device)
    else:
        target = _checked_target(target, lead_shape, vocab, ignore_index, device).reshape(n)
        valid = target != ignore_index
        target = torch.where(valid, target, 0)
    row_weight = valid.to(stats_dtype)
    if weights is not None:
        row_weight = row_weight * _checked_row_vector(weights, "weights", n, device).to(stats_dtype)
    if reduction == "mean":
        denominator = valid.sum().clamp_min(1) if normalizer is None else torch.as_tensor(normalizer, device=device)
        row_weight = row_weight / denominator.to(stats_dtype)
    if threshold is not None and not isinstance(threshold, (int, float)):
        threshold = _checked_row_vector(threshold, "threshold", n, device)
    if seq_len is not None:
        _check_seq_len(seq_len, n, threshold)
    return _Call(settings, impl, target, valid, row_weight, reduction != "none", stats_dtype, threshold, seq_len)


def _reference_rows(s: torch.Tensor, t: torch.Tensor, call: _Call) -> tuple[torch.Tensor, _RowStats]:
    # Ignored rows (padding) may hold garbage; zeroing them keeps NaN out of autograd's sums.
    s_tf = call.settings.student.apply(torch.where(call.valid[:, None], s, 0.0))
    t_tf = call.settings.teacher.apply(torch.where(call.valid[:, None], t, 0.0))
    div = reference.per_token_divergence(s_tf, t_tf, call.settings.kind, call.settings.beta)
    loss = _weighted_loss(call.row_weight, div, call.reduce)
    stats = reference.monitoring_statistics(
        torch.log_softmax(s_tf.detach(), -1), torch.log_softmax(t_tf, -1), t_tf, call.target
    )
    out = _RowStats.empty(s.shape[0], s.device, call.stats_dtype)
    out.fill(div.detach(), stats)
    return loss, out


def _finish(loss: torch.Tensor, out: _RowStats, call: _Call) -> DivergenceOutput:
    valid = call.valid
    result = DivergenceOutput(
        loss=loss,
        per_token=torch.where(valid, out.divergence, 0.0),
        teacher_entropy=torch.where(valid, out.teacher_entropy, math.nan),
    )
    if call.target is not None:
        result.student_logprob = torch.where(valid, out.student_logprob, math.nan)
        result.teacher_logprob = torch.where(valid, out.teacher_logprob, math.nan)
        result.teacher_rank = torch.where(valid, out.teacher_rank, -1)
    if call.threshold is not None:
        result.stray = valid & (out.divergence > call.threshold)
        if call.seq_len is not None:
            result.first_stray = first_stray_index(result.stray, call.seq_len)
    return result


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _settings(kind, beta, temperature, logit_scale, softcap) -> _Settings:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "fkl" if beta == 0.0 else "rkl"  # TRL's special cases at the ends
    scales = _pair(logit_scale, "logit_scale")
    caps = _pair(softcap, "softcap")
    for value in scales:
        if not (value is not None and value > 0 and math.isfinite(value)):
            raise ValueError(f"logit_scale must be positive and finite, got {logit_scale}")
    for value in caps:
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"softcap must be positive and finite (or None), got {softcap}")
    student, teacher = (reference.LogitTransform(sc, cap, temperature) for sc, cap in zip(scales, caps))
    return _Settings(kind, beta, student, teacher)


def _pair(value, name):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} takes one value or a (student, teacher) pair, got {value!r}")
        return tuple(None if v is None else float(v) for v in value)
    return (None if value is None else float(value),) * 2


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    if impl == "triton" and not triton_usable_on(device):
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {device.type}); on CPU it runs only under the Triton "
            "interpreter (TRITON_INTERPRET=1), which is meant for tests"
        )
    return impl


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_same_device(named: dict[str, torch.Tensor | None]) -> None:
    devices = {name: x.device for name, x in named.items() if x is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(
            "all tensors must be on one device, got " + ", ".join(f"{k} on {v}" for k, v in devices.items())
        )


def _check_linear_inputs(hs, ws, ht, wt, bs, bt) -> None:
    for x, name in ((hs, "student_hidden"), (ws, "student_weight"), (ht, "teacher_hidden"), (wt, "teacher_weight")):
        _check_float(x, name)
    for w, name in ((ws, "student_weight"), (wt, "teacher_weight")):
        if w.dim() != 2:
            raise ValueError(f"{name} must be [vocab, hidden], got shape {tuple(w.shape)}")
    for h, w, who in ((hs, ws, "student"), (ht, wt, "teacher")):
        if h.dim() < 1 or h.shape[-1] != w.shape[1]:
            raise ValueError(
                f"{who}_hidden has hidden size {h.shape[-1] if h.dim() else None} (shape {tuple(h.shape)}) but "
                f"{who}_weight is {tuple(w.shape)}: the last dimension of the hidden states must equal the weight's"
            )
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"student and teacher rows differ: student_hidden {tuple(hs.shape)} vs teacher_hidden {tuple(ht.shape)}"
        )
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"vocabulary mismatch: student LM head has {ws.shape[0]} entries, teacher {wt.shape[0]}; "
            "distillation needs one shared vocabulary"
        )
    for b, name in ((bs, "student_bias"), (bt, "teacher_bias")):
        if b is not None:
            _check_float(b, name)
            if tuple(b.shape) != (ws.shape[0],):
                raise ValueError(f"{name} must be [{ws.shape[0]}] (one per vocabulary entry), got {tuple(b.shape)}")
    _check_same_device(
        {
            "student_hidden": hs,
            "student_weight": ws,
            "teacher_hidden": ht,
            "teacher_weight": wt,
            "student_bias": bs,
            "teacher_bias": bt,
        }
    )


def _check_logit_inputs(s: torch.Tensor, t: torch.Tensor) -> None:
    _check_float(s, "student_logits")
    _check_float(t, "teacher_logits")
    if s.dim() < 1 or s.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"student and teacher rows differ: {tuple(s.shape)} vs {tuple(t.shape)}")
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"vocabulary mismatch: student logits have {s.shape[-1]} entries, teacher {t.shape[-1]}")
    _check_same_device({"student_logits": s, "teacher_logits": t})


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _checked_target(target, lead_shape, vocab, ignore_index, device) -> torch.Tensor:
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of token ids, got {getattr(target, 'dtype', type(target))}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the inputs are on {device}")
    if target.shape != lead_shape and target.shape != (math.prod(lead_shape),):
        raise ValueError(f"target has shape {tuple(target.shape)}, expected {tuple(lead_shape)} (one id per row)")
    target = target.long()
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"target holds id {int(target[bad][0])} outside the vocabulary [0, {vocab}) and is not "
            f"ignore_index={ignore_index}"
        )
    return target


def _checked_row_vector(x, name: str, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of {n} values or a number, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.numel() != n:
        raise ValueError(f"{name} must have one value per row ({n}), got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")
    return x.reshape(n)


def _check_seq_len(seq_len, n: int, threshold) -> None:
    if threshold is None:
        raise ValueError("seq_len groups rows for first_stray, which needs a threshold")
    if isinstance(seq_len, int):
        if seq_len <= 0 or n % seq_len:
            raise ValueError(f"seq_len={seq_len} must be a positive divisor of the number of rows ({n})")
        return
    lengths = torch.as_tensor(seq_len)
    if lengths.dim() != 1 or lengths.is_floating_point() or bool((lengths < 0).any()) or int(lengths.sum()) != n:
        raise ValueError(f"seq_len lengths must be non-negative integers summing to the number of rows ({n})")
