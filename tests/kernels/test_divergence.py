"""fused_linear_divergence / logit_divergence against TRL's GKD loss and float64 ground truth.

Idiom (Cut Cross-Entropy's): the ground truth is TRL's ``generalized_jsd_loss`` run in float64;
an implementation run in float32 must be no further from it than the same naive PyTorch loss run
in float32, up to a small factor and tolerance. Inputs are fresh random draws, never all zeros.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from motab_kernels import FusedLinearDivergence, first_stray_index, fused_linear_divergence, logit_divergence
from motab_kernels.divergence import rows
from motab_kernels.divergence.checks import DivergenceOptions
from motab_kernels.reference import per_token_divergence

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
try:  # TRL moved GKD under trl.experimental in 1.x
    from trl.experimental.gkd import GKDTrainer
except ImportError:
    try:
        from trl import GKDTrainer
    except ImportError:
        GKDTrainer = None
if GKDTrainer is None and os.environ.get("CI"):
    raise ImportError("CI must have trl installed: its GKD loss is the tests' independent oracle")
# The lent GPU machines have no trl: there the GPU tests use the float64 reference, which CI
# checks against TRL (test_float64_reference_equals_trl).
requires_trl = pytest.mark.skipif(GKDTrainer is None, reason="trl is not installed")


def trl_jsd(student_logits, teacher_logits, labels, beta, temperature, reduction="batchmean"):
    return GKDTrainer.generalized_jsd_loss(
        student_logits, teacher_logits, labels, beta=beta, temperature=temperature, reduction=reduction
    )


def reference_jsd(student_logits, teacher_logits, labels, beta, temperature, reduction="batchmean"):
    """Our float64 reference with TRL's masking and reduction conventions."""
    mask = labels != -100
    per_token = per_token_divergence(student_logits / temperature, teacher_logits / temperature, "jsd", beta)[mask]
    assert reduction == "batchmean"
    return per_token.sum() / mask.sum().clamp_min(1)


# Tests run on the GPU when there is one (compiled kernels), else on the CPU (Triton interpreted).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ["triton", "chunked", "reference"]
# (kind, beta): every kind, and JSD at both special ends, next to an end, and in the middle.
KIND_BETA = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.0), ("jsd", 1e-3), ("jsd", 0.5), ("jsd", 1.0)]
# V and N deliberately not multiples of any block or chunk size.
N, DS, DT, V = 37, 24, 40, 1003


def trl_beta(kind: str, beta: float) -> float:
    return {"fkl": 0.0, "rkl": 1.0}.get(kind, beta)


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    truth = truth.double()
    return ((x.double() - truth).norm() / truth.norm().clamp_min(1e-300)).item()


def assert_no_worse(ours: torch.Tensor, naive: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """Our error against the truth may exceed the naive float32 error by a small factor + tolerance."""
    err, err_naive = rel_err(ours, truth), rel_err(naive, truth)
    assert err <= 3.0 * err_naive + 5e-6, f"{what}: relative error {err:.3g} vs naive {err_naive:.3g}"


def rounded(inp: dict, dtype: torch.dtype) -> dict:
    """``inp`` with every float tensor rounded to ``dtype`` (kept in float64): the truth computed
    from these measures the kernel's own error, not the rounding of its inputs."""
    return {
        k: x.to(dtype).double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for k, x in inp.items()
    }


def assert_half_precision_error(ours, naive, truth, dtype: torch.dtype, what: str, is_loss: bool) -> None:
    """Half-precision inputs, truth from the same rounded inputs. The loss is formed in fp32: its
    error must stay near fp32's (≤ 1e-4). Gradients come back in ``dtype``: rounding the result
    alone costs up to its unit roundoff u, and the student-logit gradient is itself stored in
    ``dtype`` before the last GEMM, so allow 8u. Either way no worse than naive PyTorch at ``dtype``."""
    err, err_naive = rel_err(ours, truth), rel_err(naive, truth)
    bound = 1e-4 if is_loss else 8 * torch.finfo(dtype).eps / 2
    assert err <= bound and err <= err_naive, f"{what}: {err:.3g} (bound {bound:.3g}), naive {err_naive:.3g}"


def make_inputs(n=N, ds=DS, dt=DT, v=V, seed=0, logit_std=3.0, bias=False, ignored=(3, 17), device=DEVICE):
    """Random float64 inputs whose logits have standard deviation ``logit_std``."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "hs": torch.randn(n, ds, generator=g, dtype=torch.float64),
        "ws": torch.randn(v, ds, generator=g, dtype=torch.float64) * logit_std / math.sqrt(ds),
        "ht": torch.randn(n, dt, generator=g, dtype=torch.float64),
        "wt": torch.randn(v, dt, generator=g, dtype=torch.float64) * logit_std / math.sqrt(dt),
        "bs": torch.randn(v, generator=g, dtype=torch.float64) if bias else None,
        "bt": torch.randn(v, generator=g, dtype=torch.float64) if bias else None,
    }
    target = torch.randint(0, v, (n,), generator=g)
    target[[i for i in ignored if i < n]] = -100
    inputs["target"] = target
    return {k: x.to(device) if isinstance(x, torch.Tensor) else x for k, x in inputs.items()}


def trl_truth(inp, kind, beta, dtype, temperature=1.0, reduction="batchmean", grad_weights=None, oracle=None):
    """TRL's loss (or ``oracle``'s) on naively materialised logits at ``dtype``, with autograd gradients."""
    hs, ws = (inp[k].to(dtype).clone().requires_grad_() for k in ("hs", "ws"))
    bs = None if inp["bs"] is None else inp["bs"].to(dtype).clone().requires_grad_()
    s = torch.nn.functional.linear(hs, ws, bs)
    t = torch.nn.functional.linear(
        inp["ht"].to(dtype), inp["wt"].to(dtype), None if inp["bt"] is None else inp["bt"].to(dtype)
    )
    loss = (oracle or trl_jsd)(
        s[None], t[None], inp["target"][None], beta=trl_beta(kind, beta), temperature=temperature, reduction=reduction
    )
    if reduction == "none":
        loss = loss.sum(-1)  # TRL drops the ignored rows: one value per valid token
    grad_out = torch.ones_like(loss) if grad_weights is None else grad_weights[inp["target"] != -100].to(dtype)
    loss.backward(grad_out)
    return loss.detach(), hs.grad, ws.grad, None if bs is None else bs.grad


def run_ours(inp, impl, dtype=torch.float32, grad_weights=None, **kw):
    hs, ws = (inp[k].to(dtype).clone().requires_grad_() for k in ("hs", "ws"))
    bs = None if inp["bs"] is None else inp["bs"].to(dtype).clone().requires_grad_()
    bt = None if inp["bt"] is None else inp["bt"].to(dtype)
    out = fused_linear_divergence(
        hs,
        ws,
        inp["ht"].to(dtype),
        inp["wt"].to(dtype),
        target=inp["target"],
        student_bias=bs,
        teacher_bias=bt,
        impl=impl,
        **kw,
    )
    grad_out = torch.ones_like(out.loss) if grad_weights is None else grad_weights.to(out.loss.dtype)
    out.loss.backward(grad_out)
    return out, hs.grad, ws.grad, None if bs is None else bs.grad


def run_monitor(inp, dtype, impl, **options):
    """A forward-only call (no gradient, per-row loss) on ``inp`` at ``dtype``."""
    return fused_linear_divergence(
        *(inp[k].to(dtype) for k in ("hs", "ws", "ht", "wt")),
        target=inp["target"],
        student_bias=inp["bs"].to(dtype),
        teacher_bias=inp["bt"].to(dtype),
        impl=impl,
        reduction="none",
        **options,
    )


@requires_trl
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,beta", KIND_BETA)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_trl(impl, kind, beta, reduction):
    # a fixed seed per case (Python salts hash() of strings per process; crc32 is stable)
    inp = make_inputs(bias=True, seed=zlib.crc32(repr((kind, beta, reduction)).encode()) % 1000)
    trl_reduction = {"mean": "batchmean", "sum": "sum", "none": "none"}[reduction]
    # With "none", a random upstream gradient checks that backward weights each row by it.
    grad_weights = torch.rand(N, dtype=torch.float64, device=DEVICE) + 0.5 if reduction == "none" else None
    truth = trl_truth(inp, kind, beta, torch.float64, 0.9, trl_reduction, grad_weights)
    naive = trl_truth(inp, kind, beta, torch.float32, 0.9, trl_reduction, grad_weights)
    out, *grads = run_ours(
        inp, impl, kind=kind, beta=beta, temperature=0.9, reduction=reduction, grad_weights=grad_weights
    )
    valid = inp["target"] != -100
    loss = out.loss[valid] if reduction == "none" else out.loss
    if reduction == "none":
        assert torch.all(out.loss[~valid] == 0)
    assert_no_worse(loss, naive[0], truth[0], "loss")
    for name, ours, nv, tr in zip(("d hidden", "d weight", "d bias"), grads, naive[1:], truth[1:]):
        assert ours.dtype == torch.float32
        assert_no_worse(ours, nv, tr, name)


@requires_trl
@pytest.mark.parametrize("impl", IMPLS)
def test_float64_reference_equals_trl(impl):
    if impl == "triton":
        with pytest.raises(TypeError, match="float64"):
            run_ours(make_inputs(), impl, dtype=torch.float64)
        return
    inp = make_inputs(bias=True)
    for kind, beta in KIND_BETA:
        truth = trl_truth(inp, kind, beta, torch.float64)
        out, *grads = run_ours(inp, impl, dtype=torch.float64, kind=kind, beta=beta)
        assert rel_err(out.loss, truth[0]) < 1e-12
        for ours, tr in zip(grads, truth[1:]):
            assert rel_err(ours, tr) < 1e-10


@requires_trl
@pytest.mark.parametrize("impl", IMPLS)
def test_logit_scale_softcap_and_temperature(impl):
    """Scale, soft-cap and temperature, each model its own, against an inline transform fed to TRL."""
    inp = make_inputs(logit_std=20.0)
    scales, caps, temperature = (0.5, 1.5), (30.0, 15.0), 0.7

    def transformed(x, scale, cap):
        return cap * torch.tanh(x * scale / cap)

    def naive(dtype):
        hs, ws = (inp[k].to(dtype).clone().requires_grad_() for k in ("hs", "ws"))
        s = transformed(hs @ ws.T, scales[0], caps[0])
        t = transformed(inp["ht"].to(dtype) @ inp["wt"].to(dtype).T, scales[1], caps[1])
        loss = trl_jsd(s[None], t[None], inp["target"][None], beta=0.3, temperature=temperature)
        loss.backward()
        return loss.detach(), hs.grad, ws.grad

    truth, nv = naive(torch.float64), naive(torch.float32)
    out, gh, gw, _ = run_ours(
        inp, impl, kind="jsd", beta=0.3, temperature=temperature, logit_scale=scales, softcap=caps
    )
    for ours, n_, t_, name in zip((out.loss, gh, gw), nv, truth, ("loss", "d hidden", "d weight")):
        assert_no_worse(ours, n_, t_, name)


@requires_trl
@pytest.mark.parametrize("impl", IMPLS)
def test_weights_and_normalizer(impl):
    inp = make_inputs()
    weights = torch.rand(N, dtype=torch.float64, device=DEVICE) * 2
    valid = inp["target"] != -100
    truth = trl_truth(inp, "jsd", 0.5, torch.float64, reduction="none", grad_weights=weights)
    expected = (truth[0] * weights[valid]).sum()
    out, gh, _, _ = run_ours(inp, impl, reduction="sum", weights=weights.float())
    assert rel_err(out.loss, expected) < 1e-5
    assert rel_err(gh, truth[1]) < 1e-4
    out = fused_linear_divergence(
        inp["hs"].float(),
        inp["ws"].float(),
        inp["ht"].float(),
        inp["wt"].float(),
        target=inp["target"],
        weights=weights.float(),
        normalizer=7.0,
        impl=impl,
    )
    assert rel_err(out.loss, expected / 7.0) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(impl, reduction):
    inp = make_inputs(n=5, ignored=range(5), bias=True)
    out, *grads = run_ours(inp, impl, reduction=reduction)
    assert torch.all(out.loss == 0) and torch.all(out.per_token == 0)
    for g in grads:
        assert torch.isfinite(g).all() and torch.all(g == 0)
    assert torch.isnan(out.student_logprob).all() and torch.all(out.teacher_rank == -1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_garbage_in_ignored_rows_changes_nothing(impl, reduction):
    """Padding rows may carry NaN/inf hidden states (e.g. fully masked attention): with their
    target ignored they must not touch the loss, the gradients or the other rows."""
    inp = make_inputs(bias=True)
    ignored = inp["target"] == -100
    dirty = dict(inp)
    dirty["hs"] = inp["hs"].clone()
    dirty["ht"] = inp["ht"].clone()
    dirty["hs"][ignored] = float("nan")
    dirty["ht"][ignored] = float("inf")
    grad_weights = torch.rand(N, dtype=torch.float64, device=DEVICE) if reduction == "none" else None
    clean_out, *clean_grads = run_ours(inp, impl, reduction=reduction, grad_weights=grad_weights)
    dirty_out, *dirty_grads = run_ours(dirty, impl, reduction=reduction, grad_weights=grad_weights)
    torch.testing.assert_close(dirty_out.loss, clean_out.loss)
    torch.testing.assert_close(dirty_out.per_token, clean_out.per_token)
    torch.testing.assert_close(dirty_grads[0][~ignored], clean_grads[0][~ignored])
    assert torch.all(dirty_grads[0][ignored] == 0)
    for dirty_grad, clean_grad in zip(dirty_grads[1:], clean_grads[1:]):
        torch.testing.assert_close(dirty_grad, clean_grad)


@requires_trl
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_huge_logits_stay_finite(impl, kind):
    """Logits of ±1e4: everything finite, and no further from float64 than naive float32 is.

    Reverse KL is ill-conditioned there (its gradient subtracts two numbers near 3e4), and JSD's
    gradient is ~1e-15 (the distributions are disjoint): hence absolute errors, not relative ones.
    """
    inp = make_inputs(logit_std=1e4, seed=5)
    truth = trl_truth(inp, kind, 0.5, torch.float64)
    naive = trl_truth(inp, kind, 0.5, torch.float32)
    out, gh, gw, _ = run_ours(inp, impl, kind=kind)
    valid = inp["target"] != -100
    for x in (out.loss, out.per_token, out.teacher_entropy[valid], out.student_logprob[valid], gh, gw):
        assert torch.isfinite(x).all()
    assert rel_err(out.loss, truth[0]) < 1e-6
    with torch.no_grad():  # the forward-only path
        monitor = fused_linear_divergence(
            *(inp[k].float() for k in ("hs", "ws", "ht", "wt")), kind=kind, target=inp["target"], impl=impl
        )
    assert torch.isfinite(monitor.per_token).all() and rel_err(monitor.loss, truth[0]) < 1e-6
    for ours, nv, tr in zip((gh, gw), naive[1:], truth[1:]):
        err, err_naive = (ours.double() - tr).abs().max().item(), (nv.double() - tr).abs().max().item()
        assert err <= 5 * err_naive + 1e-5, f"{err:.3g} vs naive {err_naive:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_monitoring_statistics(impl, kind):
    inp = make_inputs(v=517, seed=3)
    temperature = 1.3

    def run(target):
        tensors = (inp[name].float() for name in ("hs", "ws", "ht", "wt"))
        return fused_linear_divergence(*tensors, kind=kind, target=target, temperature=temperature, impl=impl)

    out = run(inp["target"])
    s = (inp["hs"] @ inp["ws"].T) / temperature
    t = (inp["ht"] @ inp["wt"].T) / temperature
    target = inp["target"]
    valid = target != -100
    p = torch.softmax(t, -1)
    entropy = -(p * torch.log(p)).sum(-1)
    torch.testing.assert_close(out.teacher_entropy[valid].double(), entropy[valid], rtol=1e-5, atol=1e-5)
    assert torch.isnan(out.teacher_entropy[~valid]).all()
    rows = torch.arange(N, device=DEVICE)[valid]
    tg = target[valid]
    torch.testing.assert_close(
        out.student_logprob[valid].double(), torch.log_softmax(s, -1)[rows, tg], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        out.teacher_logprob[valid].double(), torch.log_softmax(t, -1)[rows, tg], rtol=1e-5, atol=1e-5
    )
    rank = (t[rows] > t[rows, tg][:, None]).sum(-1)
    assert torch.equal(out.teacher_rank[valid].long(), rank)
    assert rank.min() < rank.max()  # the draw exercises more than one rank

    top, bottom = t.argmax(-1), t.argmin(-1)
    for planted, expected in ((top, 0), (bottom, t.shape[1] - 1)):
        assert torch.all(run(planted).teacher_rank == expected)


@pytest.mark.parametrize("impl", ["triton", "auto"])
@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_forward_only_default_is_the_buffered_pass(kind, impl):
    """Monitoring calls take the buffered chunk pass, the only Triton route (the fused monitor
    kernel, which lost to it on the H200, lives in benchmarks/fused_monitor.py)."""
    if impl == "auto" and DEVICE.type != "cuda":
        pytest.skip("auto picks triton on CUDA only")
    inp = make_inputs(n=9, bias=True, seed=1)
    with torch.no_grad():
        ours = run_monitor(inp, torch.float32, impl, kind=kind)
    truth = run_monitor(inp, torch.float64, "reference", kind=kind)
    valid = inp["target"] != -100
    torch.testing.assert_close(ours.per_token[valid].double(), truth.per_token[valid], rtol=1e-4, atol=1e-5)


def test_fused_monitor_is_no_longer_an_impl():
    inp = make_inputs(n=5, bias=True, seed=3)
    with pytest.raises(ValueError, match=r"impl='fused_monitor'.*'auto', 'triton', 'chunked', 'reference'"):
        run_monitor(inp, torch.float32, "fused_monitor", kind="fkl")
    logits = torch.randn(4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="expected one of"):
        logit_divergence(logits, logits, kind="fkl", impl="fused_monitor")


def test_first_stray_index_planted():
    stray = torch.tensor([0, 0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 0], dtype=torch.bool)
    assert first_stray_index(stray, 4).tolist() == [2, 0, 1]
    assert first_stray_index(stray, 6).tolist() == [2, 3]
    # ragged, with a sequence that never strays (rows 7-8) and an empty one
    assert first_stray_index(stray, [3, 0, 4, 2, 3]).tolist() == [2, 0, 1, 2, 0]
    assert first_stray_index(torch.zeros(8, dtype=torch.bool), [5, 3]).tolist() == [5, 3]


@pytest.mark.parametrize("impl", IMPLS)
def test_boundary_in_the_op(impl):
    """Rows where student == teacher have divergence 0; planted rows far from the teacher stray."""
    g = torch.Generator().manual_seed(11)
    teacher = torch.randn(12, 301, generator=g) * 3
    student = teacher.clone()
    planted = [2, 4, 9, 10]
    student[planted] = torch.randn(4, 301, generator=g) * 3
    target = torch.randint(0, 301, (12,), generator=g)
    target[4] = -100  # an ignored row never strays, whatever its score
    student, teacher, target = student.to(DEVICE), teacher.to(DEVICE), target.to(DEVICE)
    tau = torch.full((12,), 0.1, device=DEVICE)
    tau[9] = 1e9  # a per-row boundary it cannot cross
    out = logit_divergence(student, teacher, kind="fkl", target=target, threshold=tau, seq_len=[3, 3, 6], impl=impl)
    assert out.stray.tolist() == [i in (2, 10) for i in range(12)]
    assert out.first_stray.tolist() == [2, 3, 4]
    assert torch.all(out.per_token[[0, 1, 3, 5, 6, 7, 8, 11]].abs() < 1e-5)
    out = logit_divergence(student, teacher, kind="fkl", threshold=0.1, seq_len=4, impl=impl)
    assert out.first_stray.tolist() == [2, 0, 1]


@requires_trl
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("jsd", 0.5), ("jsd", 1.0)])
def test_logit_divergence_matches_trl(impl, kind, beta):
    inp = make_inputs()
    s64 = (inp["hs"] @ inp["ws"].T).requires_grad_()
    t64 = inp["ht"] @ inp["wt"].T
    truth = trl_jsd(s64[None], t64[None], inp["target"][None], beta=trl_beta(kind, beta), temperature=2.0)
    truth.backward()
    s = s64.detach().float().requires_grad_()
    out = logit_divergence(
        s, t64.float(), kind=kind, beta=beta, temperature=2.0, target=inp["target"], impl=impl, chunk_size=8
    )
    out.loss.backward()
    assert rel_err(out.loss, truth) < 1e-5
    assert rel_err(s.grad, s64.grad) < 1e-4


class _LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel() * x.element_size())
        return out


def _largest_allocation(impl, reduction, n, v, chunk):
    inp = make_inputs(n=n, v=v, ds=8, dt=8)
    hs = inp["hs"].float().requires_grad_()
    ws = inp["ws"].float().requires_grad_()
    with _LargestTensor() as rec:
        out = fused_linear_divergence(
            hs,
            ws,
            inp["ht"].float(),
            inp["wt"].float(),
            target=inp["target"],
            impl=impl,
            reduction=reduction,
            chunk_size=chunk,
        )
        out.loss.sum().backward()
    return rec.largest


@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_allocates_rows_by_vocab(impl, reduction):
    """Forward and backward: the largest tensor is a few [chunk, V] fp32 blocks, whatever N is."""
    v, chunk = 301, 16
    small, large = (_largest_allocation(impl, reduction, n, v, chunk) for n in (64, 192))
    if impl == "reference":
        assert large >= 192 * v * 4  # the detector does see an [N, V] tensor when one is made
    else:
        assert small == large <= 2 * chunk * v * 4, f"{impl}: {small} / {large} bytes for N = 64 / 192"


@requires_trl
@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(impl, dtype):
    """Half-precision inputs: gradients in the inputs' dtypes, error no worse than naive at that dtype."""
    inp = rounded(make_inputs(seed=9), dtype)
    truth = trl_truth(inp, "jsd", 0.5, torch.float64)
    naive = trl_truth(inp, "jsd", 0.5, dtype)
    out, gh, gw, _ = run_ours(inp, impl, dtype=dtype)
    assert out.loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    for ours, nv, tr, name in zip((out.loss, gh, gw), naive, truth, ("loss", "d hidden", "d weight")):
        assert_half_precision_error(ours, nv, tr, dtype, name, is_loss=name == "loss")


@requires_trl
def test_mixed_dtypes_follow_the_weight_or_autocast():
    inp = make_inputs(seed=4)
    hs = inp["hs"].float().requires_grad_()
    ws = inp["ws"].bfloat16().requires_grad_()
    out = fused_linear_divergence(hs, ws, inp["ht"].float(), inp["wt"].float(), target=inp["target"])
    out.loss.backward()
    assert hs.grad.dtype == torch.float32 and ws.grad.dtype == torch.bfloat16
    hs.grad = None
    ws32 = inp["ws"].float().requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = fused_linear_divergence(hs, ws32, inp["ht"].float(), inp["wt"].float(), target=inp["target"])
    out.loss.backward()
    assert hs.grad.dtype == torch.float32 and ws32.grad.dtype == torch.float32
    # under autocast the GEMMs see bf16 operands: the truth is computed from those, in float64
    truth = trl_truth(rounded(inp, torch.bfloat16), "jsd", 0.5, torch.float64)[0]
    naive = trl_truth(inp, "jsd", 0.5, torch.bfloat16)[0]
    assert_half_precision_error(out.loss, naive, truth, torch.bfloat16, "loss under autocast", is_loss=True)


def test_teacher_gets_no_gradient():
    inp = make_inputs()
    ht = inp["ht"].float().requires_grad_()
    wt = inp["wt"].float().requires_grad_()
    out = fused_linear_divergence(inp["hs"].float().requires_grad_(), inp["ws"].float(), ht, wt, target=inp["target"])
    out.loss.backward()
    assert ht.grad is None and wt.grad is None


def test_leading_dimensions_are_flattened():
    inp = make_inputs(n=12, ignored=())
    hs, ht = inp["hs"].float().view(3, 4, DS), inp["ht"].float().view(3, 4, DT)
    out = fused_linear_divergence(hs, inp["ws"].float(), ht, inp["wt"].float(), target=inp["target"].view(3, 4))
    flat = fused_linear_divergence(
        inp["hs"].float(), inp["ws"].float(), inp["ht"].float(), inp["wt"].float(), target=inp["target"]
    )
    torch.testing.assert_close(out.per_token, flat.per_token)


def test_module_matches_function():
    inp = make_inputs()
    args = (inp["hs"].float(), inp["ws"].float(), inp["ht"].float(), inp["wt"].float())
    module = FusedLinearDivergence(kind="rkl", temperature=0.8)
    torch.testing.assert_close(
        module(*args, inp["target"]).loss,
        fused_linear_divergence(*args, kind="rkl", temperature=0.8, target=inp["target"]).loss,
    )
    with pytest.raises(ValueError, match="unknown divergence kind"):
        FusedLinearDivergence(kind="kl")


def test_public_signatures_agree_with_the_options():
    """The three public entry points spell their keywords out; the options' defaults live only in
    ``DivergenceOptions``. Each entry point takes exactly its fields, with their defaults and
    annotations, and the per-row keywords (all ``None`` by default) agree between them."""
    options = {f.name: f for f in dataclasses.fields(DivergenceOptions)}
    linear = inspect.signature(fused_linear_divergence).parameters
    logits = inspect.signature(logit_divergence).parameters
    module = inspect.signature(FusedLinearDivergence.__init__).parameters
    forward = inspect.signature(FusedLinearDivergence.forward).parameters
    assert list(logits)[:2] == ["student_logits", "teacher_logits"]
    assert [name for name in module if name != "self"] == list(options)
    for name, field in options.items():
        for parameters in (linear, logits, module):
            assert parameters[name].default == field.default, name
            assert parameters[name].annotation == field.type, name
    per_row = {name: p for name, p in linear.items() if name not in options and p.kind is p.KEYWORD_ONLY}
    assert set(per_row) == {
        "target",
        "weights",
        "normalizer",
        "threshold",
        "seq_len",
        "cu_seqlens",
        "student_bias",
        "teacher_bias",
    }
    assert {n: p for n, p in logits.items() if n not in options and p.kind is p.KEYWORD_ONLY} == {
        n: p for n, p in per_row.items() if not n.endswith("_bias")
    }
    for name, parameter in per_row.items():
        assert parameter.default is None
        assert (forward[name].default, forward[name].annotation) == (None, parameter.annotation), name


def test_auto_picks_chunked_on_cpu_and_triton_needs_a_gpu(monkeypatch):
    inp = make_inputs(device="cpu")
    args = (inp["hs"].float(), inp["ws"].float(), inp["ht"].float(), inp["wt"].float())
    calls = []
    real = rows.rows_chunked
    monkeypatch.setattr(rows, "rows_chunked", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused_linear_divergence(*args)
    assert calls
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA"):
        fused_linear_divergence(*args, impl="triton")


def _bad_call_cases():
    inp = make_inputs(n=6, ignored=())
    hs, ws, ht, wt = (inp[k].float() for k in ("hs", "ws", "ht", "wt"))
    target = inp["target"]
    return [
        ((hs[:5], ws, ht, wt), {}, ValueError, "rows differ"),
        ((hs, ws[:-1], ht, wt), {}, ValueError, r"vocabulary mismatch.*1002.*1003"),
        ((hs[:, :-1], ws, ht, wt), {}, ValueError, "hidden size"),
        ((hs, ws, ht, wt[:, :-1]), {}, ValueError, "teacher_hidden has hidden size"),
        ((hs, ws, ht, wt), {"beta": 1.5}, ValueError, "beta"),
        ((hs, ws, ht, wt), {"temperature": 0.0}, ValueError, "temperature"),
        ((hs, ws, ht, wt), {"kind": "kl"}, ValueError, "unknown divergence kind"),
        ((hs, ws, ht, wt), {"impl": "cuda"}, ValueError, "unknown impl"),
        ((hs, ws, ht, wt), {"reduction": "batchmean"}, ValueError, "unknown reduction"),
        ((hs.long(), ws, ht, wt), {}, TypeError, "student_hidden must be a floating-point"),
        ((hs, ws, ht, wt), {"target": target.float()}, TypeError, "integer tensor"),
        ((hs, ws, ht, wt), {"target": target[:4]}, ValueError, "target has shape"),
        ((hs, ws, ht, wt), {"target": target.clone().fill_(1003)}, ValueError, "outside the vocabulary"),
        ((hs, ws, ht, wt), {"threshold": 0.1, "seq_len": 4}, ValueError, "positive divisor"),
        ((hs, ws, ht, wt), {"seq_len": 3}, ValueError, "needs a threshold"),
        ((hs, ws, ht, wt), {"threshold": 0.1, "seq_len": [2, 2]}, ValueError, "summing"),
        ((hs, ws, ht, wt), {"weights": torch.ones(5, device=DEVICE)}, ValueError, "one value per row"),
        ((hs, ws, ht, wt), {"normalizer": 3.0, "reduction": "sum"}, ValueError, "normalizer"),
        ((hs, ws, ht, wt), {"softcap": (30.0, -1.0)}, ValueError, "softcap"),
        ((hs, ws, ht, wt), {"student_bias": torch.zeros(7, device=DEVICE)}, ValueError, "student_bias"),
        ((hs, ws, ht.to("meta"), wt.to("meta")), {}, ValueError, "one device"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_call_cases())))
def test_bad_input_names_the_problem(case):
    args, kwargs, error, message = _bad_call_cases()[case]
    with pytest.raises(error, match=message):
        fused_linear_divergence(*args, **kwargs)


def test_logit_divergence_bad_input():
    with pytest.raises(ValueError, match=r"vocabulary mismatch.*10.*11"):
        logit_divergence(torch.randn(3, 10), torch.randn(3, 11))
    with pytest.raises(TypeError, match="floating-point"):
        logit_divergence(torch.randint(0, 3, (3, 10)), torch.randn(3, 10))


# ------------------------------------------------------------------------------------------------
# GPU only: compiled kernels, bf16 at real vocabulary sizes, int64 offsets.
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_accuracy(kind, dtype):
    torch.manual_seed(0)
    n, ds, dt, v = 1024, 512, 768, 32000 + 3
    inp = rounded(make_inputs(n, ds, dt, v), dtype)
    truth = trl_truth(inp, kind, 0.5, torch.float64, oracle=reference_jsd)
    naive = trl_truth(inp, kind, 0.5, dtype, oracle=reference_jsd)
    out, gh, gw, _ = run_ours(inp, "triton", dtype=dtype, kind=kind)
    for ours, nv, tr, name in zip((out.loss, gh, gw), naive, truth, ("loss", "d hidden", "d weight")):
        assert_half_precision_error(ours, nv, tr, dtype, name, is_loss=name == "loss")


@pytest.mark.gpu
def test_gpu_auto_is_triton():
    inp = make_inputs()
    args = (inp["hs"].float(), inp["ws"].float(), inp["ht"].float(), inp["wt"].float())
    auto = fused_linear_divergence(*args, target=inp["target"])
    triton = fused_linear_divergence(*args, target=inp["target"], impl="triton")
    assert torch.equal(auto.per_token, triton.per_token)


# Rows 1.2e9 elements apart: an int32 stride, but row 2 starts 2.4e9 elements in, past 2^31. The
# views cover a mostly untouched allocation, so only the rows' own pages are ever written.
_FAR_ROWS = """
import json, sys, torch
from motab_kernels import logit_divergence
device, rows, vocab, stride = sys.argv[1], 3, 1003, 1_200_000_000
def far_apart_rows(seed):
    storage = torch.empty((rows - 1) * stride + vocab, dtype=torch.bfloat16, device=device)
    view = storage.as_strided((rows, vocab), (stride, 1))
    g = torch.Generator().manual_seed(seed)
    for r in range(rows):
        view[r] = torch.randn(vocab, generator=g).to(device, torch.bfloat16)
    return view
s, t = far_apart_rows(0), far_apart_rows(1)
ours = logit_divergence(s, t, kind="fkl", impl="triton", reduction="none").per_token
naive = [torch.nn.functional.kl_div(s[r].float().log_softmax(-1), t[r].float().log_softmax(-1), log_target=True,
                                    reduction="sum") for r in range(rows)]
print(json.dumps(dict(ours=ours.tolist(), naive=[float(x) for x in naive])))
"""


def test_row_offsets_past_2_31_are_int64():
    """The row kernel forms each row's offset in int64. Mutation run (2026-11-26, CPU interpreter):
    without ``.to(tl.int64)`` on the row index the process died of a segmentation fault (SIGSEGV);
    on a GPU the wrapped offset reads another row or faults. A subprocess, so that such a crash is
    a clean failure here (and cannot poison a CUDA context shared with other tests)."""
    result = subprocess.run([sys.executable, "-c", _FAR_ROWS, DEVICE.type], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    values = json.loads(result.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(values["ours"]), torch.tensor(values["naive"]), rtol=1e-5, atol=1e-5)
