"""The fused monitor kernel, kept for measurement only: forward-only fkl/rkl straight from hidden
states, the logit tiles never leaving registers (Triton's tensor-core dots, split over the
vocabulary, merged in log space), so nothing of size ``[rows, V]`` is ever written.

It was ``impl="fused_monitor"`` of ``motab_kernels`` until it lost to the buffered pass (cuBLAS
logits into the chunk buffer + the row kernel) everywhere it was measured (H200, bf16, 2026-11-26,
fkl: 71.2 vs 31.3 ms at N, Ds, Dt, V = 8192, 4096, 4096, 128256; 54.1 vs 25.6 ms at 8192, 1536,
3584, 151936; 6.50 vs 3.34 ms at 1024 rows; ``RESULTS.md``). It lives here so that
``bench_divergence.py`` (its ``fused_monitor`` rows) and ``kernel_resources.py`` (its registers and
spills) can still measure it against the buffered path; ``tests/kernels/test_fused_monitor.py``
checks it against the float64 reference.

``fused_monitor_divergence`` takes ``fused_linear_divergence``'s arguments (but ``impl`` and
``chunk_size``), checks them the same way and returns the same ``DivergenceOutput``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from motab_kernels._runtime import next_power_of_2, triton_interpreting
from motab_kernels.divergence.api import DivergenceOutput, _linear_divergence, _wants_grad
from motab_kernels.divergence.autograd import weighted_loss
from motab_kernels.divergence.checks import DEFAULTS, Call, DivergenceOptions, RowInputs, Settings
from motab_kernels.divergence.kernels import KIND_CODES, _transform
from motab_kernels.divergence.passes import HiddenStates
from motab_kernels.divergence.rows import RowStats, last_dim_contiguous


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
def fused_monitor_kernel(
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
        s = _logit_tile(HS, WS, BS, rows, cols, row_mask, col_mask, DS, stride_hs, stride_ws, HAS_BS,
                        DOT_FP32, PRECISION, BM, BV, BK)  # fmt: skip
        s = tl.where(valid, _transform(s, s_scale, s_cap, inv_temp, S_HAS_CAP), float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
        alpha_s = tl.exp(m_s - m_s_new)
        e_s = tl.exp(s - m_s_new[:, None])
        z_s = z_s * alpha_s + tl.sum(e_s, axis=1)
        m_s = m_s_new
        t = _logit_tile(HT, WT, BT, rows, cols, row_mask, col_mask, DT, stride_ht, stride_wt, HAS_BT,
                        DOT_FP32, PRECISION, BM, BV, BK)  # fmt: skip
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


# The kinds the fused kernel computes; JSD needs both normalisers before any of its terms.
FUSED_MONITOR_KINDS = ("fkl", "rkl")
# Programs per SM the fused kernel aims for (counting 64-row blocks): enough waves that the last
# one's tail stays a small fraction of the run.
_MONITOR_WAVES = 8


def monitor_configs() -> list[triton.Config]:
    # Tiles that compile without register spills on sm_90 for both kinds (see
    # benchmarks/kernel_resources.py); larger ones (128×128) spill: two fp32 tiles live at once.
    shapes = [(64, 64, 64, 8, 3), (64, 64, 128, 8, 3), (64, 128, 64, 8, 3)]
    return [triton.Config({"BM": bm, "BV": bv, "BK": bk}, num_warps=w, num_stages=st) for bm, bv, bk, w, st in shapes]


if triton_interpreting():
    # The interpreter runs one program at a time: small fixed tiles, no autotuning.
    _fused_monitor_launch = fused_monitor_kernel
    _INTERPRETED_TILES = {"BM": 16, "BV": 64, "BK": 16}
else:
    _fused_monitor_launch = triton.autotune(configs=monitor_configs(), key=["N_BUCKET", "V", "DS", "DT"])(
        fused_monitor_kernel
    )
    _INTERPRETED_TILES = {}


@torch.no_grad()
def fused_monitor(source: HiddenStates, target: torch.Tensor | None, settings: Settings) -> RowStats:
    """Per-row results of a forward-only fkl/rkl call, straight from hidden states and weights."""
    hs, ws, bs, ht, wt, bt = source.tensors
    hs, ws, ht, wt = (last_dim_contiguous(x) for x in (hs, ws, ht, wt))
    n, vocab = hs.shape[0], ws.shape[0]
    device = hs.device
    out = RowStats.empty(n, device, torch.float32)
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
        KIND=KIND_CODES[settings.kind],
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


def _combine_monitor_partials(part, part_rank, kind, s_target, t_target, out: RowStats) -> None:
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


def fused_monitor_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kind: str = DEFAULTS.kind,
    beta: float = DEFAULTS.beta,
    temperature: float = DEFAULTS.temperature,
    target: torch.Tensor | None = None,
    ignore_index: int = DEFAULTS.ignore_index,
    reduction: str = DEFAULTS.reduction,
    weights: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    threshold: float | torch.Tensor | None = None,
    seq_len: int | torch.Tensor | list[int] | None = None,
    cu_seqlens: torch.Tensor | list[int] | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_scale: float | tuple[float, float] = DEFAULTS.logit_scale,
    softcap: float | tuple[float | None, float | None] | None = DEFAULTS.softcap,
) -> DivergenceOutput:
    """``fused_linear_divergence`` by the fused monitor kernel: forward only (no input may want a
    gradient), ``fkl`` or ``rkl`` (``jsd`` at β = 0 or 1 counts as those), CUDA tensors or the
    Triton interpreter, float32 or half precision; the same checks, then one launch."""
    # impl="triton": the same device and dtype checks as the Triton row kernel (no chunks here)
    options = DivergenceOptions(kind, beta, temperature, ignore_index, reduction, logit_scale, softcap, "triton", None)
    rows = RowInputs(target, weights, normalizer, threshold, seq_len, cu_seqlens)
    hidden = (student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias)
    return _linear_divergence(*hidden, options, rows, route=_monitor_route)


def _monitor_route(source: HiddenStates, call: Call) -> tuple[torch.Tensor, RowStats]:
    """The fused kernel as the route of a checked call: refuses what it does not compute, then one launch."""
    if _wants_grad(source):
        raise ValueError("the fused monitor kernel is forward-only; a call that needs gradients takes impl='triton'")
    if call.settings.kind not in FUSED_MONITOR_KINDS:
        raise ValueError(
            f"the fused monitor kernel computes {' and '.join(FUSED_MONITOR_KINDS)}, not {call.settings.kind}; "
            "use impl='triton'"
        )
    out = fused_monitor(source, call.target, call.settings)
    return weighted_loss(call.row_weight, out.divergence, call.reduce), out
