"""Forward-only monitoring straight from hidden states: the host side of the fused monitor kernel
(its tiles and autotuning, the launch, and the merge of its per-split partials). Runs fkl and rkl
when a call asks for ``impl="fused_monitor"``: the logit tiles never leave registers, so its floor
is the two GEMMs themselves, but on the H200 it ran 2× slower than the buffered pass (cuBLAS into
a logit buffer + the row kernel), which is therefore the default (see ``api._divergence``)."""

from __future__ import annotations

import torch
import triton

from motab_kernels._runtime import next_power_of_2, triton_interpreting
from motab_kernels.divergence.checks import Settings
from motab_kernels.divergence.kernels import KIND_CODES, fused_monitor_kernel
from motab_kernels.divergence.passes import HiddenStates
from motab_kernels.divergence.rows import RowStats, last_dim_contiguous

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
