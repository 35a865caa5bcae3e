"""Triton kernels of the fused divergence: the row kernel (divergence, statistics and student-logit
gradient of one row of a logit buffer), launched from ``rows.py``; the math is in the package
docstring. (The forward-only fused monitor kernel, which lost to the buffered pass, is kept for
measurement in ``benchmarks/fused_monitor.py`` and builds on ``_transform`` here.)
"""

import triton
import triton.language as tl

# The kernels' KIND codes; "jsd" with β ∈ {0, 1} is mapped to the two KLs before launch.
KIND_CODES = {"fkl": 0, "rkl": 1, "jsd": 2}


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
def divergence_rows_kernel(
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
