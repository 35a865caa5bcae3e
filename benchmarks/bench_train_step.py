"""One ``motab train`` step end to end: rollout, both models' hidden states, fused loss, backward,
optimizer step. Wall time per step, trained tokens per second and peak memory.

GPU: random Qwen2.5-1.5B-shaped student and 7B-shaped teacher in bf16 (autocast), MOTAB rollout
with a fixed boundary; CPU: tiny models (labelled CPU). Writes ``train_step.json`` and
``train_step.md`` under ``--out``.
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import bench_parser, parse_bench_args, run_facts, stage, write_results
from _models import student_and_teacher
from _timing import sync

from motab.config import MonitorConfig, RolloutConfig, TrainConfig
from motab.data import Problem
from motab.trainer import DistillationTrainer


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    args, device = parse_bench_args(parser, argv)
    on_gpu = device.type == "cuda"
    stage(f"building the models on {device}")
    student, teacher, vocab, dtype = student_and_teacher(device, cpu_vocab=1000)
    prompt_len, new_tokens, prompts, micro = (256, 256, 16, 4) if on_gpu else (8, 24, 8, 4)
    g = torch.Generator().manual_seed(0)
    problems = [
        Problem(str(i), torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), None, None) for i in range(64)
    ]
    rollout = RolloutConfig(
        max_new_tokens=new_tokens,
        draft_len=8,
        intervention_len=8,
        monitor=MonitorConfig(rule="fixed", tau=2.0, warmup=8),
    )
    config = TrainConfig(
        output_dir="/tmp/motab-bench-train",
        steps=args.steps + 1,
        prompts_per_step=prompts,
        micro_batch=micro,
        rollout=rollout,
        learning_rate=1e-6,
        gradient_checkpointing=on_gpu,
        save_every=10_000,
    )
    trainer = DistillationTrainer(student, teacher, None, problems, config)
    stage("warm-up step (compilation, allocator)")
    trainer.train_step()
    times, tokens, peaks = [], [], []
    for step in range(args.steps):
        stage(f"timed step {step + 1} of {args.steps}")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        metrics = trainer.train_step()
        sync(device)
        times.append(time.perf_counter() - start)
        tokens.append(metrics["student_tokens"] + metrics["teacher_tokens"])
        peaks.append(torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None)
    step_s = statistics.median(times)
    row = run_facts(
        device,
        dtype=str(dtype),
        prompts_per_step=prompts,
        prompt=prompt_len,
        new_tokens=new_tokens,
        step_s=step_s,
        tokens_per_s=statistics.median(tokens) / step_s,
        peak_GiB=max(peaks) if on_gpu else None,
    )
    peak = "—" if row["peak_GiB"] is None else f"{row['peak_GiB']:.1f}"
    lines = [
        f"motab train step on {row['card']}, {dtype}, {row['date']}",
        "",
        "| prompts/step | prompt | new tokens | step s | trained tokens/s | peak GiB |",
        "|---|---|---|---|---|---|",
        f"| {prompts} | {prompt_len} | {new_tokens} | {step_s:.2f} | {row['tokens_per_s']:.1f} | {peak} |",
    ]
    print("\n".join(lines))
    write_results(args.out, "train_step", row, "\n".join(lines))


if __name__ == "__main__":
    main()
