"""Rollout throughput: MOTAB and the baselines in our engine vs the way TRL's GKD does it.

Committed tokens per second of wall time for ``motab``, ``on_policy`` and ``off_policy`` in the
paged engine, and for the GKD way: HF ``generate`` samples the student's completions, then one
teacher forward over the result scores them (full logits). Same random models (Qwen2.5-1.5B-shaped
student and 7B-shaped teacher in bf16, built directly on the GPU; tiny ones on a CPU), same
prompts (64 tokens, 128 new tokens on a GPU), batch 1/16/64. Random models have no natural stray
rate, so ``motab`` runs a fixed boundary τ set to the ``--stray-rate`` quantile of the scores an
on-policy pass produced; the measured interventions per 100 tokens are reported. Every way is run
once untimed at the timed batch and length, then timed as the median of ``--reps`` runs.

Then, at the largest batch, one ``motab`` rollout under ``torch.profiler`` (nothing synchronised):
the host time inside the engine's phases (``motab.<phase>`` ranges; they nest: a truncation inside
an intervention counts in both), the GPU's busy share of the wall time and its top kernels; and one
under ``motab.profiling.count_device_work``: host synchronisations, tensor operations and Triton
launches per decode round, and the Triton specialisations the rollout asked for.

On a GPU (``--no-graphs`` to skip) motab and on_policy run again with their one-token decode steps
replayed from CUDA graphs (``rollout.cuda_graphs``; graphs are captured in the untimed run), and
one seeded motab rollout is compared token for token with eager decoding.

Targets (issue 12): the default run ≤ 2 minutes including the model build; engine on_policy ≥ the
GKD way at every batch; motab ≥ 2× the GKD way at batch 64; monitor and truncation ≤ 5 % of the
rollout's wall time. Each is printed as met or missed. Every stage prints a timestamped line.
Writes ``rollout.json`` and ``rollout.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace

import torch
from _common import bench_parser, card_name, parse_bench_args, run_facts, stage, write_results
from _models import student_and_teacher
from _timing import sync

from motab.config import MonitorConfig, RolloutConfig, SamplingConfig
from motab.engine import rollout
from motab.models import PagedModel
from motab.profiling import RoundWork, count_device_work

TARGET_MINUTES = 2.0
TARGET_MOTAB_SPEEDUP = 2.0  # over the GKD way, at batch 64
TARGET_HOST_SHARE = 0.05  # monitor + truncation, of the rollout's wall time
GKD_WAY = "GKD way (HF generate + teacher forward)"


def gkd_way(student, teacher, prompts, new_tokens, sampling):
    """TRL GKD's on-policy step: generate with the student, then one teacher forward (full logits)."""
    ids = torch.tensor(prompts, device=student.device)
    out = student.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        temperature=sampling.temperature,
        top_k=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    with torch.no_grad():
        teacher(input_ids=out).logits.float()
    return out.shape[0] * new_tokens


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def median_timed(fn, device, reps):
    """``fn``'s result and the median of ``reps`` timed runs, after one untimed run at the same
    size (compilation, autotuning, allocator and caches warm for exactly what is timed)."""
    fn()
    runs = [timed(fn, device) for _ in range(reps)]
    return runs[0][0], statistics.median(seconds for _, seconds in runs)


def profiled(fn, device) -> dict:
    """Host time per engine phase, the GPU's busy share and top kernels of one ``fn()`` run."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _, wall = timed(fn, device)
    events = prof.events()
    phases: dict[str, float] = {}
    for event in events:
        if event.name.startswith("motab."):
            phases[event.name[len("motab.") :]] = (
                phases.get(event.name[len("motab.") :], 0.0) + event.cpu_time_total / 1e6
            )
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = _union_seconds([(e.time_range.start, e.time_range.end) for e in kernels])
    by_kernel: dict[str, float] = {}
    for e in kernels:
        by_kernel[e.name] = by_kernel.get(e.name, 0.0) + (e.time_range.end - e.time_range.start) / 1e6
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:8]
    return dict(wall=wall, phases=phases, gpu_busy=busy if kernels else None, kernel_launches=len(kernels), top=top)


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by µs intervals (kernels of several streams may overlap)."""
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e6


def work_per_round(paged, prompts, config) -> tuple[list, set]:
    """Device work of every draft round of one rollout (``motab.profiling``), and the Triton
    specialisations the whole rollout asked for."""
    with count_device_work(*paged) as count:
        work = RoundWork(count)
        rollout(*paged, prompts, config, round_hook=work)
    return work.rounds["draft"], count.specialisations


def graph_rows(graphed, all_prompts, batches, base, monitor, device, reps, by, rows) -> list[str]:
    """motab and on_policy with their decode steps replayed from CUDA graphs (captured in the untimed
    run) at every batch, against the GKD way and the eager engine; appends to ``rows``."""
    lines = [
        "",
        "| batch | way | tok/s | interventions per 100 tokens | × GKD way | × eager |",
        "|---|---|---|---|---|---|",
    ]
    for b in batches:
        for mode in ("motab", "on_policy"):
            stage(f"batch {b}: engine {mode}, decode steps from CUDA graphs")
            config = replace(base, mode=mode, monitor=monitor)
            prompts = all_prompts[:b]
            trajectories, seconds = median_timed(lambda c=config, p=prompts: rollout(*graphed, p, c), device, reps)
            committed = sum(len(t.tokens) for t in trajectories)
            rate, per_100 = committed / seconds, 100 * sum(len(t.interventions) for t in trajectories) / committed
            reference, eager = by[(b, GKD_WAY)]["tokens_per_s"], by[(b, f"engine {mode}")]["tokens_per_s"]
            way = f"engine {mode} + CUDA graphs"
            rows.append(
                dict(batch=b, way=way, tokens_per_s=rate, interventions_per_100=per_100, speedup=rate / reference)
            )
            lines.append(f"| {b} | {way} | {rate:.1f} | {per_100:.2f} | {rate / reference:.2f} | {rate / eager:.2f} |")
            print(lines[-1], flush=True)
    return lines


def graph_equality(paged, graphed, prompts, config) -> list[str]:
    """One seeded motab rollout with eager decode steps and one with graphs, compared row by row."""
    stage(f"CUDA graphs vs eager: one seeded motab rollout at batch {len(prompts)} each")
    seeds = list(range(len(prompts)))
    eager = [t.tokens for t in rollout(*paged, prompts, config, seeds=seeds)]
    graphs = [t.tokens for t in rollout(*graphed, prompts, config, seeds=seeds)]
    same = sum(x == y for x, y in zip(eager, graphs))
    rows = len(prompts)
    line = f"CUDA graphs vs eager, motab at batch {rows}, same seeds: {same}/{rows} rows token for token equal"
    print(line, flush=True)
    return ["", line]


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--stray-rate", type=float, default=0.02, help="share of drafted tokens above τ")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per way and batch (the median is shown)")
    parser.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time motab and on_policy with decode steps from CUDA graphs (GPU only)",
    )
    args, device = parse_bench_args(parser, argv)
    on_gpu = device.type == "cuda"
    prompt_len, new_tokens = (64, 128) if on_gpu else (8, 24)
    started = time.perf_counter()
    stage(f"building the models on {device}")
    student, teacher, vocab, dtype = student_and_teacher(device, cpu_vocab=1000)
    stage("models built")
    batches = [int(b) for b in args.batches.split(",")]
    g = torch.Generator().manual_seed(0)
    all_prompts = torch.randint(0, vocab, (max(batches), prompt_len), generator=g).tolist()
    sampling = SamplingConfig(temperature=1.0)
    base = RolloutConfig(
        max_new_tokens=new_tokens,
        draft_len=8,
        intervention_len=8,
        max_interventions=4,
        student_sampling=sampling,
        teacher_sampling=sampling,
    )
    capacity = max(batches) * (prompt_len + new_tokens + 32)

    def paged_pair(graphs: str) -> list[PagedModel]:
        return [
            PagedModel(
                m,
                max_rows=max(batches),
                max_tokens=capacity,
                max_seq_len=prompt_len + new_tokens + 64,
                decode_graphs=graphs,
            )
            for m in (student, teacher)
        ]

    paged = paged_pair("off")
    graphed = paged_pair("cuda") if on_gpu and args.graphs else None

    # τ at the requested quantile of on-policy scores (random models have no natural stray rate)
    stage("calibrating τ with one on-policy rollout of 16 prompts")
    warm = rollout(*paged, all_prompts[:16], replace(base, mode="on_policy"))
    scores = sorted(s for t in warm for s in t.scores if math.isfinite(s))
    tau = scores[min(len(scores) - 1, int((1 - args.stray_rate) * len(scores)))]
    monitor = MonitorConfig(rule="fixed", tau=tau, warmup=0)
    card = card_name(device)
    lines = [
        f"bench_rollout on {card}, {dtype}: prompt {prompt_len}, {new_tokens} new tokens, "
        f"draft 8, τ = {tau:.3g} (the {1 - args.stray_rate:.0%} quantile of on-policy fkl)",
        "",
        "| batch | way | tok/s | interventions per 100 tokens | × GKD way |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rows = []
    for b in batches:
        prompts = all_prompts[:b]
        stage(f"batch {b}: the GKD way")
        tokens, seconds = median_timed(
            lambda prompts=prompts: gkd_way(student, teacher, prompts, new_tokens, sampling), device, args.reps
        )
        reference = tokens / seconds
        results = [(GKD_WAY, reference, None)]
        for mode in ("motab", "on_policy", "off_policy"):
            stage(f"batch {b}: engine {mode}")
            config = replace(base, mode=mode, monitor=monitor)
            trajectories, seconds = median_timed(lambda c=config, p=prompts: rollout(*paged, p, c), device, args.reps)
            committed = sum(len(t.tokens) for t in trajectories)
            interventions = sum(len(t.interventions) for t in trajectories)
            results.append((f"engine {mode}", committed / seconds, 100 * interventions / committed))
        for name, rate, intervention_rate in results:
            rows.append(
                dict(
                    batch=b,
                    way=name,
                    tokens_per_s=rate,
                    interventions_per_100=intervention_rate,
                    speedup=rate / reference,
                )
            )
            shown = "—" if intervention_rate is None else f"{intervention_rate:.2f}"
            lines.append(f"| {b} | {name} | {rate:.1f} | {shown} | {rate / reference:.2f} |")
            print(lines[-1], flush=True)

    b = max(batches)
    config = replace(base, monitor=monitor)
    stage(f"profiling one motab rollout at batch {b}")
    profile = profiled(lambda: rollout(*paged, all_prompts[:b], config), device)
    wall = profile["wall"]
    lines += [
        "",
        f"motab at batch {b} under torch.profiler: {wall:.2f} s wall, "
        + (
            f"GPU busy {100 * profile['gpu_busy'] / wall:.1f}% ({profile['kernel_launches']} kernels)"
            if profile["gpu_busy"] is not None
            else "no GPU activity recorded"
        ),
        "",
        "| engine phase (host time; ranges nest) | s | share of wall |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k} | {v:.3f} | {100 * v / wall:.1f}% |"
        for k, v in sorted(profile["phases"].items(), key=lambda kv: -kv[1])
    ]
    if profile["top"]:
        lines += ["", "| kernel | GPU s |", "|---|---|"]
        lines += [f"| {name[:80]} | {seconds:.3f} |" for name, seconds in profile["top"]]
    print("\n".join(lines[-len(profile["phases"]) - 4 :]), flush=True)

    stage(f"counting device work per round of one motab rollout at batch {b}")
    rounds, specialisations = work_per_round(paged, all_prompts[:b], config)
    per_round = {k: max(getattr(r, k) for r in rounds) for k in ("syncs", "ops", "triton_launches")}
    lines += [
        "",
        f"device work per decode round (most over the {len(rounds)} rounds; batch {b}): "
        f"{per_round['syncs']} host syncs, {per_round['ops']} tensor ops, {per_round['triton_launches']} Triton "
        f"launches; {len(specialisations)} Triton specialisations in the rollout",
    ]

    by = {(r["batch"], r["way"]): r for r in rows}
    host_share = sum(profile["phases"].get(k, 0.0) for k in ("monitor", "truncation")) / wall
    minutes = (time.perf_counter() - started) / 60
    on_policy = [by[(x, "engine on_policy")]["speedup"] for x in batches]
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    lines.append(
        f"| engine on_policy ≥ GKD way at every batch | {', '.join(f'{x:.2f}×' for x in on_policy)} | "
        f"{verdict(min(on_policy) >= 1)} |"
    )
    if 64 in batches:
        speedup = by[(64, "engine motab")]["speedup"]
        lines.append(
            f"| motab ≥ {TARGET_MOTAB_SPEEDUP:g}× GKD way at batch 64 | {speedup:.2f}× | "
            f"{verdict(speedup >= TARGET_MOTAB_SPEEDUP)} |"
        )
    lines.append(
        f"| monitor + truncation ≤ {TARGET_HOST_SHARE:.0%} of wall | {100 * host_share:.1f}% | "
        f"{verdict(host_share <= TARGET_HOST_SHARE)} |"
    )
    lines.append(
        f"| whole run ≤ {TARGET_MINUTES:g} min | {minutes:.1f} min (this line excluded) | "
        f"{verdict(minutes <= TARGET_MINUTES)} |"
    )
    print("\n".join(lines[-6:]), flush=True)
    if graphed:  # after the targets, which are the eager engine's: a run cut off here has them
        lines += graph_rows(graphed, all_prompts, batches, base, monitor, device, args.reps, by, rows)
        lines += graph_equality(paged, graphed, all_prompts[:b], config)
    meta = run_facts(device, dtype=str(dtype), tau=tau, prompt=prompt_len, new_tokens=new_tokens, minutes=minutes)
    record = dict(meta=meta, rows=rows, profile=profile, work_per_round=per_round, specialisations=len(specialisations))
    write_results(args.out, "rollout", record, "\n".join(lines))
    stage("done")


if __name__ == "__main__":
    main()
