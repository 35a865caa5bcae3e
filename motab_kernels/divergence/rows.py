"""The row math on one chunk of logits, two backends with one contract: the Triton row kernel and
plain PyTorch. Each reads a ``[C, V]`` block of raw student and teacher logits and writes every
row's divergence and statistics into a ``RowStats`` and, when asked, the gradient of the weighted
divergence w.r.t. the raw student logits."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from motab_kernels._runtime import next_power_of_2, triton_interpreting
from motab_kernels.divergence.checks import Settings
from motab_kernels.divergence.kernels import KIND_CODES, divergence_rows_kernel


@dataclass
class RowStats:
    """Per-row results of the row math, written chunk by chunk into ``[N]`` tensors."""

    divergence: torch.Tensor
    teacher_entropy: torch.Tensor
    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor
    teacher_rank: torch.Tensor

    @classmethod
    def empty(cls, n: int, device: torch.device, dtype: torch.dtype) -> RowStats:
        def vec(dt: torch.dtype) -> torch.Tensor:
            return torch.empty(n, device=device, dtype=dt)

        return cls(vec(dtype), vec(dtype), vec(dtype), vec(dtype), vec(torch.int32))

    def rows(self, start: int, end: int) -> RowStats:
        return RowStats(*(getattr(self, f.name)[start:end] for f in fields(self)))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def fill(self, divergence: torch.Tensor, stats: dict[str, torch.Tensor | None]) -> None:
        self.divergence.copy_(divergence)
        for name, value in stats.items():
            if value is not None:
                getattr(self, name).copy_(value)


def run_rows(
    impl: str,
    s: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    settings: Settings,
    out: RowStats,
) -> None:
    """The row math of one chunk by ``impl`` ("triton" or "chunked").

    ``s``, ``t``: ``[C, V]`` raw logits; ``target``: ``[C]`` ids clamped into ``[0, V)`` or None;
    ``row_scale``: ``[C]`` factor of each row's divergence in the loss, given only when the gradient
    is wanted, which then goes to ``grad_out`` ``[C, V]`` (may alias ``s``); ``out``: the chunk's rows.
    """
    backend = rows_triton if impl == "triton" else rows_chunked
    backend(s, t, target, row_scale, grad_out, settings, out)


def rows_triton(s, t, target, row_scale, grad_out, settings: Settings, out: RowStats) -> None:
    """``run_rows`` by the Triton row kernel, one program per row."""
    s, t = last_dim_contiguous(s), last_dim_contiguous(t)
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
    divergence_rows_kernel[(rows,)](
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
        KIND=KIND_CODES[settings.kind],
        HAS_TARGET=target is not None,
        WANT_GRAD=want_grad,
        S_HAS_CAP=s_cap is not None,
        T_HAS_CAP=t_cap is not None,
        BV=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )


def rows_chunked(s, t, target, row_scale, grad_out, settings: Settings, out: RowStats) -> None:
    """``run_rows`` in plain PyTorch, with the closed-form gradients of the package docstring
    (autograd through log-softmax would cost twice as much)."""
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
    out.fill(div, _statistics(ls, lt, p, t, target))
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


def _statistics(ls, lt, p, t, target) -> dict[str, torch.Tensor | None]:
    """Teacher entropy and, with a target, its log-probabilities and teacher rank (entries whose
    teacher logit is strictly above the target's)."""
    stats = {"teacher_entropy": -(p * lt).sum(-1)}
    if target is not None:
        index = target.unsqueeze(-1)
        stats["student_logprob"] = ls.gather(-1, index)[..., 0]
        stats["teacher_logprob"] = lt.gather(-1, index)[..., 0]
        stats["teacher_rank"] = (t > t.gather(-1, index)).sum(-1).to(torch.int32)
    return stats


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
