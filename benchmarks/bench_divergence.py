"""Benchmark of the fused linear divergence against naive PyTorch, Liger-Kernel and the GEMM floor.

Every row names its kind, shape, implementation and mode:

- ``fwd+bwd``: loss and gradients for the student (hidden, weight), reduction mean, with target.
- ``monitor``: forward only, no gradient, with the target statistics (what a rollout calls).

Baselines: ``naive`` materialises both [N, V] logits and applies log_softmax + KL/JSD (TRL's
formula); ``liger`` is Liger-Kernel's ``LigerFusedLinearJSD`` when it is installed (JSD rows,
same β; β=0/1 for fkl/rkl), in ``fwd+bwd`` rows only: it has no forward-only path (it forms the
input gradients inside its forward even under ``no_grad``), so a ``monitor`` row of it would time
work a monitor never does. The floor of ``fwd+bwd`` is the cuBLAS time of just the matmuls the op
needs (both logit GEMMs forward, the two student-gradient GEMMs backward), timed at the same shapes
in the same run; the floor of ``monitor`` is the larger of the forward GEMM time and the time to
read both weight matrices once at the card's measured copy bandwidth. ``scratch`` is the peak
memory beyond inputs, outputs, gradients and one fp32 weight-gradient accumulator, measured from a
state that holds no gradients (the previous step's are freed first). Every way is timed as the
median of ``--reps`` runs after warm-up runs at the same shape.

On a CPU it runs small shapes (the Triton interpreter's timings are meaningless and are left out)
and no memory is measured. Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import statistics
from datetime import date

import torch
from _common import bench_parser, card_name, parse_bench_args, run_facts, write_results
from _timing import copy_bandwidth, median_seconds, run_seconds
from fused_monitor import FUSED_MONITOR_KINDS, fused_monitor_divergence

from motab_kernels import fused_linear_divergence
from motab_kernels.reference import per_token_divergence

GPU_SHAPES = [  # (N, Ds, Dt, V, modes)
    (8192, 4096, 4096, 128256, ("fwd+bwd", "monitor")),
    (8192, 1536, 3584, 151936, ("fwd+bwd", "monitor")),
    (1024, 1536, 3584, 151936, ("fwd+bwd", "monitor")),
    (64 * 16, 1536, 3584, 151936, ("monitor",)),  # decode: 64 rows × 16 drafted tokens
]
CPU_SHAPES = [
    (1024, 256, 384, 16384, ("fwd+bwd", "monitor")),
    (256, 256, 384, 32000, ("fwd+bwd", "monitor")),
    (16 * 4, 256, 384, 32000, ("monitor",)),
]
GiB = 1 << 30


def naive_loss(hs, ws, ht, wt, target, kind, beta):
    """Materialise both logits, log-softmax, divergence, masked mean: the usual way."""
    s = (hs @ ws.T).float()
    with torch.no_grad():
        t = (ht @ wt.T).float()
    per_token = per_token_divergence(s, t, kind, beta)
    valid = target != -100
    return (per_token * valid).sum() / valid.sum().clamp_min(1)


def liger_loss_fn(kind, beta):
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    jsd_beta = {"fkl": 0.0, "rkl": 1.0}.get(kind, beta)
    module = LigerFusedLinearJSD(jsd_beta=jsd_beta, ignore_index=-100, temperature=1.0)
    return lambda hs, ws, ht, wt, target: module(hs, ws, ht, wt, target)


def peak_extra_bytes(fn, device, before=None):
    """Peak bytes allocated while ``fn`` runs, beyond what was allocated before it (GPU only);
    ``before()`` runs first, outside the measurement (to free what a previous run left)."""
    if device.type != "cuda":
        return None
    if before is not None:
        before()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def make_inputs(n, ds, dt, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    target = torch.randint(0, v, (n,), generator=g)
    target[::17] = -100
    return (rand(n, ds), rand(v, ds, scale=ds**-0.5), rand(n, dt), rand(v, dt, scale=dt**-0.5), target.to(device))


def gemm_floors(hs, ws, ht, wt, reps, bandwidth):
    """Seconds of the matmuls the op cannot avoid, at the same shapes: (forward, backward, weight read)."""
    fwd = median_seconds(lambda: (hs @ ws.T, ht @ wt.T), hs.device, reps)
    grad_logits = torch.randn(hs.shape[0], ws.shape[0], device=hs.device, dtype=hs.dtype)
    bwd = median_seconds(lambda: (grad_logits @ ws, grad_logits.T @ hs), hs.device, reps)
    weight_read = None if bandwidth is None else (ws.numel() + wt.numel()) * ws.element_size() / bandwidth
    return fwd, bwd, weight_read


def loss_functions(impls, kind, beta, device, backward, chunk_sizes=()):
    """name → loss(hs, ws, ht, wt, target) for our impls (``triton@K``: the triton impl with chunks
    of K rows) and the baselines."""
    fns = {
        impl: lambda hs, ws, ht, wt, target, impl=impl: (
            fused_linear_divergence(hs, ws, ht, wt, kind=kind, beta=beta, target=target, impl=impl).loss
        )
        for impl in impls
    }
    for rows in chunk_sizes if "triton" in impls else ():
        fns[f"triton@{rows}"] = lambda hs, ws, ht, wt, target, rows=rows: (
            fused_linear_divergence(
                hs, ws, ht, wt, kind=kind, beta=beta, target=target, impl="triton", chunk_size=rows
            ).loss
        )
    if "triton" in impls and not backward and kind in FUSED_MONITOR_KINDS:
        # the fused monitor kernel (logit tiles in registers; benchmarks/fused_monitor.py), next to
        # the buffered ``triton`` monitor (cuBLAS logits into the chunk buffer + the row kernel), same card
        fns["fused_monitor"] = lambda hs, ws, ht, wt, target: (
            fused_monitor_divergence(hs, ws, ht, wt, kind=kind, beta=beta, target=target).loss
        )
    fns["naive"] = lambda hs, ws, ht, wt, target: naive_loss(hs, ws, ht, wt, target, kind, beta)
    liger = liger_loss_fn(kind, beta)
    if liger is not None and device.type == "cuda" and backward:  # no forward-only path: see the docstring
        fns["liger"] = liger
    return fns


def make_step(loss_fn, inputs, backward):
    """The timed step, and what frees the gradients a previous step left (so that memory is
    measured from a state without them: they are counted once, in ``accumulated``)."""
    hs, ws, ht, wt, target = inputs

    def free_gradients():
        hs.grad = ws.grad = None

    def step():
        if backward:
            free_gradients()
            loss_fn(hs, ws, ht, wt, target).backward()
        else:
            with torch.no_grad():
                loss_fn(hs, ws, ht, wt, target)

    return step, free_gradients


def bench_shape(n, ds, dt, v, modes, kinds, beta, dtype, device, impls, reps, bandwidth, chunk_sizes=()):
    hs, ws, ht, wt, target = make_inputs(n, ds, dt, v, dtype, device)
    fwd_gemm, bwd_gemm, weight_read = gemm_floors(hs, ws, ht, wt, reps, bandwidth)
    floors = {
        "fwd+bwd": fwd_gemm + bwd_gemm,
        "monitor": fwd_gemm if weight_read is None else max(fwd_gemm, weight_read),
    }
    accumulated = (hs.numel() + ws.numel()) * hs.element_size() + ws.numel() * 4  # grads + fp32 acc
    rows = []
    for kind in kinds:
        for mode in modes:
            backward = mode == "fwd+bwd"
            inputs = (hs.detach().requires_grad_(backward), ws.detach().requires_grad_(backward), ht, wt, target)
            for name, loss_fn in loss_functions(impls, kind, beta, device, backward, chunk_sizes).items():
                step, free_gradients = make_step(loss_fn, inputs, backward)
                try:
                    runs = run_seconds(step, device, reps)
                    seconds = statistics.median(runs)
                    peak = peak_extra_bytes(step, device, before=free_gradients)
                except torch.OutOfMemoryError:
                    runs, seconds, peak = [], None, "OOM"
                    torch.cuda.empty_cache()
                scratch = peak - (accumulated if backward else 0) if isinstance(peak, int) else None
                rows.append(
                    {
                        "kind": kind,
                        "mode": mode,
                        "N": n,
                        "Ds": ds,
                        "Dt": dt,
                        "V": v,
                        "impl": name,
                        "ms": None if seconds is None else seconds * 1e3,
                        "ms_min": min(runs) * 1e3 if runs else None,
                        "ms_max": max(runs) * 1e3 if runs else None,
                        "floor_ms": floors[mode] * 1e3,
                        "x_floor": None if seconds is None else seconds / floors[mode],
                        "peak_extra_GiB": peak / GiB if isinstance(peak, int) else peak,
                        "scratch_GiB": None if scratch is None else scratch / GiB,
                        "fwd_gemm_ms": fwd_gemm * 1e3,
                        "bwd_gemm_ms": bwd_gemm * 1e3,
                        "weight_read_ms": None if weight_read is None else weight_read * 1e3,
                    }
                )
                print(format_row(rows[-1]), flush=True)
    return rows


def fmt(x, digits=2):
    if x is None:
        return "—"
    return x if isinstance(x, str) else f"{x:.{digits}f}"


HEADER = (
    "| kind | mode | N | Ds | Dt | V | impl | ms, median (min–max) | floor ms | × floor | peak extra GiB | "
    "scratch GiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r):
    spread = "" if r["ms_min"] is None else f" ({fmt(r['ms_min'])}–{fmt(r['ms_max'])})"
    return (
        f"| {r['kind']} | {r['mode']} | {r['N']} | {r['Ds']} | {r['Dt']} | {r['V']} | {r['impl']} | "
        f"{fmt(r['ms'])}{spread} | {fmt(r['floor_ms'])} | {fmt(r['x_floor'])} | {fmt(r['peak_extra_GiB'])} | "
        f"{fmt(r['scratch_GiB'])} |"
    )


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--kinds", default="fkl,jsd", help="comma-separated: fkl, rkl, jsd")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--shapes", default=None, help="N,Ds,Dt,V[;...] instead of the default set")
    parser.add_argument(
        "--chunk-sizes",
        default="",
        help="comma-separated rows per chunk: also time the triton impl with each (scratch grows with it)",
    )
    args, device = parse_bench_args(parser, argv)
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    reps = args.reps or (10 if on_gpu else 3)
    impls = ["triton", "chunked"] if on_gpu else ["chunked"]
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    if args.shapes:
        shapes = [(*map(int, s.split(",")), ("fwd+bwd", "monitor")) for s in args.shapes.split(";")]
    kinds = args.kinds.split(",")
    chunk_sizes = [int(rows) for rows in args.chunk_sizes.split(",") if rows]
    card = card_name(device)
    bandwidth = copy_bandwidth(device) if on_gpu else None
    print(f"# bench_divergence on {card}, {dtype}, {date.today()}")
    if bandwidth:
        print(f"# measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)")
    print(HEADER)
    rows = []
    for n, ds, dt, v, modes in shapes:
        rows += bench_shape(n, ds, dt, v, modes, kinds, args.beta, dtype, device, impls, reps, bandwidth, chunk_sizes)
        if on_gpu:
            torch.cuda.empty_cache()

    meta = run_facts(device, dtype=str(dtype), copy_bandwidth_TBps=None if bandwidth is None else bandwidth / 1e12)
    lines = [f"bench_divergence on {card}, {dtype}, {meta['date']}, torch {torch.__version__}", "", HEADER]
    write_results(args.out, "results", {"meta": meta, "rows": rows}, "\n".join(lines + [format_row(r) for r in rows]))


if __name__ == "__main__":
    main()
