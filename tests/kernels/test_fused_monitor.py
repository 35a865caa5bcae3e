"""The fused monitor kernel of benchmarks/fused_monitor.py (kept for measurement, not part of
motab_kernels) against the float64 reference, so that its benchmark rows stay a fair comparison."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

from motab_kernels import fused_linear_divergence
from tests.kernels.test_divergence import (
    DEVICE,
    DS,
    DT,
    N,
    V,
    assert_half_precision_error,
    assert_no_worse,
    make_inputs,
    rounded,
    run_monitor,
)

# benchmarks/ is no package: its scripts import each other by name, from their own folder.
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))
import fused_monitor  # noqa: E402


def run_fused(inp, dtype, **options):
    """``run_monitor``'s forward-only call, by the fused monitor kernel."""
    return fused_monitor.fused_monitor_divergence(
        *(inp[k].to(dtype) for k in ("hs", "ws", "ht", "wt")),
        target=inp["target"],
        student_bias=inp["bs"].to(dtype),
        teacher_bias=inp["bt"].to(dtype),
        reduction="none",
        **options,
    )


def test_takes_the_public_keywords():
    """``fused_linear_divergence``'s parameters but ``impl`` and ``chunk_size``, the same defaults."""
    ours = inspect.signature(fused_monitor.fused_monitor_divergence).parameters
    public = inspect.signature(fused_linear_divergence).parameters
    assert list(ours.values()) == [p for name, p in public.items() if name not in ("impl", "chunk_size")]


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("n", [1, 37])
def test_fused_monitor_path(kind, n, monkeypatch):
    """Forward only: the fused kernel (logit tiles in registers) against float64, with bias,
    per-model scale and soft-cap, temperature and ignored rows; and it really ran."""
    launches = []
    real = fused_monitor.fused_monitor
    monkeypatch.setattr(fused_monitor, "fused_monitor", lambda *a, **k: launches.append(1) or real(*a, **k))
    inp = make_inputs(n=n, bias=True, ignored=(3,), logit_std=6.0, seed=n)
    options = dict(kind=kind, temperature=0.8, softcap=(20.0, None), logit_scale=(1.2, 0.9))
    truth = run_monitor(inp, torch.float64, "reference", **options)
    naive = run_monitor(inp, torch.float32, "reference", **options)
    ours = run_fused(inp, torch.float32, **options)
    assert launches
    valid = inp["target"] != -100
    for name in ("per_token", "teacher_entropy", "student_logprob", "teacher_logprob"):
        x, nv, tr = (getattr(o, name)[valid] for o in (ours, naive, truth))
        assert_no_worse(x, nv, tr, name)
    assert torch.equal(ours.teacher_rank, truth.teacher_rank)
    assert torch.equal(ours.loss[~valid], torch.zeros_like(ours.loss[~valid]))


def test_fused_monitor_refuses_what_it_does_not_compute():
    inp = make_inputs(n=5, bias=True, seed=3)
    with pytest.raises(ValueError, match="computes fkl and rkl, not jsd"):
        run_fused(inp, torch.float32, kind="jsd", beta=0.5)
    hs = inp["hs"].float().requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        fused_monitor.fused_monitor_divergence(hs, inp["ws"].float(), inp["ht"].float(), inp["wt"].float(), kind="fkl")


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_fused_monitor_bf16(kind):
    """The fused forward kernel on bf16 inputs (tensor-core dots on a GPU; interpreted on a CPU, at
    test size) against float64 computed from the same rounded inputs: statistics at fp32
    precision, and each teacher rank off by at most the entries whose logit lies within the fp32
    accumulation error of the target's (those may legitimately swap sides)."""
    n, ds, dt, v = (1024, 512, 768, 32000 + 3) if DEVICE.type == "cuda" else (N, DS, DT, V)
    inp = rounded(make_inputs(n, ds, dt, v, bias=True, seed=2), torch.bfloat16)
    truth = run_monitor(inp, torch.float64, "reference", kind=kind)
    naive = run_monitor(inp, torch.bfloat16, "reference", kind=kind)
    ours = run_fused(inp, torch.bfloat16, kind=kind)
    valid = inp["target"] != -100
    for name in ("per_token", "teacher_entropy", "student_logprob", "teacher_logprob"):
        x, nv, tr = (getattr(o, name)[valid] for o in (ours, naive, truth))
        assert_half_precision_error(x, nv, tr, torch.bfloat16, name, is_loss=True)
    teacher = torch.nn.functional.linear(inp["ht"], inp["wt"], inp["bt"])
    # |fp32 dot − exact dot| ≤ D·2⁻²⁴·Σ|h_i·w_i| (bf16 products are exact in fp32), per row at most:
    scale = (inp["ht"].abs() @ inp["wt"].abs().T + inp["bt"].abs()).amax(-1, keepdim=True)
    error = dt * 2.0**-24 * scale
    target = inp["target"].clamp_min(0)[:, None]
    near = ((teacher - teacher.gather(-1, target)).abs() <= 2 * error).sum(-1) - 1  # not the target itself
    gap = (ours.teacher_rank - truth.teacher_rank).abs()
    assert torch.all(gap[valid] <= near[valid]), f"rank gaps {gap[valid].max()} beyond the ties {near[valid].max()}"
