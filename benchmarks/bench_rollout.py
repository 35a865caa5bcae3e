"""Rollout throughput: MOTAB and the baselines in our engine vs the way TRL's GKD does it.

Committed tokens per second of wall time for ``motab``, ``on_policy`` and ``off_policy`` in the
paged engine, and for the GKD way: HF ``generate`` samples the student's completions, then one
teacher forward over the result scores them (full logits). Same random models (Qwen2.5-1.5B-shaped
student and 7B-shaped teacher in bf16 on a GPU, tiny ones on a CPU), same prompts, batch 1/16/64.
Random models have no natural stray rate, so ``motab`` runs a fixed boundary τ set to the
``--stray-rate`` quantile of the scores an on-policy pass produced; the measured intervention rate
is reported. Every way is run once untimed at the timed batch and length, then timed as the median
of ``--reps`` runs. A separately timed ``motab`` run gives the time breakdown (each phase
synchronised).
Writes ``rollout.json`` and ``rollout.md`` under ``--out``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace
from datetime import date

import torch
from _common import bench_parser, card_name, parse_bench_args, run_facts, write_results
from _models import student_and_teacher
from _timing import sync

from motab.config import MonitorConfig, RolloutConfig, SamplingConfig
from motab.engine import rollout
from motab.models import PagedModel


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


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--stray-rate", type=float, default=0.02, help="share of drafted tokens above τ")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per way and batch (the median is shown)")
    args, device = parse_bench_args(parser, argv)
    on_gpu = device.type == "cuda"
    prompt_len, new_tokens = (64, 128) if on_gpu else (8, 24)
    student, teacher, vocab, dtype = student_and_teacher(device, cpu_vocab=1000)
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
    paged = [
        PagedModel(m, max_rows=max(batches), max_tokens=capacity, max_seq_len=prompt_len + new_tokens + 64)
        for m in (student, teacher)
    ]

    # τ at the requested quantile of on-policy scores (random models have no natural stray rate)
    warm = rollout(*paged, all_prompts[:16], replace(base, mode="on_policy"))
    scores = sorted(s for t in warm for s in t.scores if math.isfinite(s))
    tau = scores[min(len(scores) - 1, int((1 - args.stray_rate) * len(scores)))]
    monitor = MonitorConfig(rule="fixed", tau=tau, warmup=0)
    card = card_name(device)
    lines = [
        f"bench_rollout on {card}, {dtype}, {date.today()}: prompt {prompt_len}, {new_tokens} new tokens, "
        f"draft 8, τ = {tau:.3g} (the {1 - args.stray_rate:.0%} quantile of on-policy fkl)",
        "",
        "| batch | way | tok/s | interventions per 100 tokens | × GKD way |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    rows = []
    for b in batches:
        prompts = all_prompts[:b]
        tokens, seconds = median_timed(
            lambda prompts=prompts: gkd_way(student, teacher, prompts, new_tokens, sampling), device, args.reps
        )
        reference = tokens / seconds
        results = [("GKD way (HF generate + teacher forward)", reference, None)]
        for mode in ("motab", "on_policy", "off_policy"):
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
    timings = {}
    b = max(batches)
    _, total = timed(lambda: rollout(*paged, all_prompts[:b], replace(base, monitor=monitor), timings=timings), device)
    timings["host and other"] = total - sum(timings.values())
    lines += [
        "",
        f"motab time breakdown at batch {b} (phases synchronised; {total:.2f} s in all):",
        "",
        "| phase | s | share |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} | {100 * v / total:.1f}% |" for k, v in sorted(timings.items(), key=lambda kv: -kv[1])]
    print("\n".join(lines[-len(timings) - 4 :]))
    meta = run_facts(device, dtype=str(dtype), tau=tau, prompt=prompt_len, new_tokens=new_tokens)
    write_results(args.out, "rollout", dict(meta=meta, rows=rows, breakdown=timings), "\n".join(lines))


if __name__ == "__main__":
    main()
