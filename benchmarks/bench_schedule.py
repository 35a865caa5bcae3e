"""Continuous batching with pages on demand against static batches, on the toy task.

The toy's shipped teacher and an untrained toy student (the demo's shape) synthesise step_motab
trajectories (the toy preset: 96 tokens, steps of up to 24, corrections of at least 48) for
problems of 1 to 10 steps, so the rows' lengths are mixed: most end well before their budget.
Four ways, the same prompts and per-row seeds (so the same trajectories, which the benchmark
checks), ``--rows`` rows at most in flight unless said:

- ``static``: batches of ``--rows`` prompts, each run until its longest row ends (a barrier per
  batch), on pools that hold every row's whole budget (what the engine did before pages on demand);
- ``continuous``: one rollout, a prompt entering as soon as a row finishes, the same pools;
- ``continuous, as many as fit``: the same pools, the rows in flight not capped (the commands'
  default: a row holds only what it has written, so the same memory holds more rows);
- ``continuous, as many as fit, ¼ pool``: the same on pools a quarter the size (rows that outgrow
  it are preempted and recomputed).

For each: rows/s (median, min and max of ``--repeats`` runs), the teacher pool's peak tokens in
use and its size, the most rows holding pages at once, and preemptions. Writes ``schedule.json``
and ``schedule.md`` under ``--out``.
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import bench_parser, machine_load, parse_bench_args, run_facts, stage, write_results

from motab.config import RolloutConfig, SamplingConfig
from motab.demo.run import STUDENT_SHAPE
from motab.demo.toy_models import toy_model
from motab.engine import paged_for_rollouts, rollout
from motab.engine.schedule import tokens_per_row
from motab.policy import resolve
from motab.toy.task import PAPER_PRESET, STEP_DELIMITER, generate_split
from motab.toy.teacher import load_teacher


def toy_config(tokenizer) -> RolloutConfig:
    """The toy preset of ``motab synthesize`` (step_motab)."""
    sampling = SamplingConfig(temperature=PAPER_PRESET["temperature"])
    config = RolloutConfig(
        mode="step_motab",
        step_stop=PAPER_PRESET["stop"],
        max_new_tokens=PAPER_PRESET["max_new_tokens"],
        max_step_tokens=PAPER_PRESET["max_step_tokens"],
        min_correction_tokens=PAPER_PRESET["min_correction_tokens"],
        student_sampling=sampling,
        teacher_sampling=sampling,
    )
    assert config.step_stop == STEP_DELIMITER
    return resolve(config, tokenizer)[0]


class PeakPool:
    """The most tokens a PagedModel's pool held at once, and the most rows holding any (read
    after every page reservation)."""

    def __init__(self, paged) -> None:
        self.paged, self.peak_blocks, self.peak_rows = paged, 0, 0
        reserve = paged.cache.reserve

        def counted(*args, **kwargs):
            slots = reserve(*args, **kwargs)
            self.peak_blocks = max(self.peak_blocks, paged.cache.num_blocks - paged.cache.num_free_blocks)
            self.peak_rows = max(self.peak_rows, sum(1 for n in paged.cache.lengths() if n))
            return slots

        paged.cache.reserve = counted

    @property
    def peak_tokens(self) -> int:
        return self.peak_blocks * self.paged.cache.block_size


def run_way(models, prompts, seeds, tokenizer, config, *, rows: int, pool: int, static: bool, device):
    """One way: its trajectories, seconds, the teacher pool's peak and size, preemptions."""
    longest = max(map(len, prompts))
    slots = rows or len(prompts)  # uncapped: a slot for every prompt, the pool decides
    student, teacher = (paged_for_rollouts(m, slots, longest, config, pool) for m in models)
    peak = PeakPool(teacher)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if static:
        out = []
        for first in range(0, len(prompts), rows):
            chunk = slice(first, first + rows)
            out += rollout(student, teacher, prompts[chunk], config, seeds=seeds[chunk], tokenizer=tokenizer)
    else:
        out = rollout(student, teacher, prompts, config, seeds=seeds, tokenizer=tokenizer, max_rows=rows)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    preempted = sum(t.counters["preempted"] for t in out)
    return out, seconds, peak, teacher.capacity_tokens, preempted


def same_decisions(a, b) -> bool:
    """The same text, steps kept and rewound, and root cause (values differ by float rounding)."""
    kept = [(s["start"], s["kept"]) for s in a.steps] == [(s["start"], s["kept"]) for s in b.steps]
    return a.tokens == b.tokens and kept and a.root_cause == b.root_cause


def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=10, help="problems of 1 to this many steps (at most 10)")
    args, device = parse_bench_args(parser, argv)
    torch.manual_seed(0)
    teacher, tokenizer = load_teacher(str(device))
    student = toy_model(tokenizer, STUDENT_SHAPE, 0).to(device).eval()
    config = toy_config(tokenizer)
    problems = generate_split("train", args.prompts, steps=(1, args.max_steps))
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    seeds = list(range(len(prompts)))
    whole = (tokens_per_row(max(map(len, prompts)), config) + config.block_size) * args.rows
    ways = {
        "static": dict(rows=args.rows, pool=whole, static=True),
        "continuous": dict(rows=args.rows, pool=whole, static=False),
        "continuous, as many as fit": dict(rows=None, pool=whole, static=False),
        "continuous, as many as fit, ¼ pool": dict(rows=None, pool=whole // 4, static=False),
    }
    stage(f"{len(prompts)} prompts, {args.rows} rows, pool of {whole} tokens for the whole budget of each row")
    results, reference = {}, None
    for name, way in ways.items():
        runs = []
        load_before = machine_load()["load_1min"]
        for _ in range(args.repeats):
            out, seconds, peak, size, preempted = run_way((student, teacher), prompts, seeds, tokenizer, config,
                                                          device=device, **way)  # fmt: skip
            runs.append(seconds)
        reference = reference or out
        same = sum(same_decisions(a, b) for a, b in zip(out, reference))
        tokens = sum(len(t.tokens) for t in out)
        results[name] = dict(
            **way,
            seconds=runs,
            rows_per_s=len(prompts) / statistics.median(runs),
            tokens_per_s=tokens / statistics.median(runs),
            peak_pool_tokens=peak.peak_tokens,
            peak_rows=peak.peak_rows,
            pool_tokens=size,
            preempted=preempted,
            same_as_static=same,
            load_before=load_before,
        )
        stage(f"{name}: {results[name]['rows_per_s']:.2f} rows/s, peak {peak.peak_tokens} of {size} tokens, "
              f"{peak.peak_rows} rows, {preempted} preempted, "
              f"{same}/{len(prompts)} the same")  # fmt: skip
    lengths = sorted(len(t.tokens) for t in reference)
    base = results["static"]
    lines = [
        f"Toy step_motab, {len(prompts)} prompts of 1–{args.max_steps} steps, response tokens: "
        f"median {statistics.median(lengths)}, "
        f"min {lengths[0]}, max {lengths[-1]} (budget {config.max_new_tokens}); {device}",
        "",
        "| way | rows in flight (cap; most) | rows/s (median; min–max) | × static | teacher pool peak / size (tokens) "
        "| preempted | same trajectories |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        flight = f"{'as many as fit' if r['rows'] is None else r['rows']}; {r['peak_rows']}"
        spread = f"{len(prompts) / max(r['seconds']):.2f}–{len(prompts) / min(r['seconds']):.2f}"
        lines.append(
            f"| {name} | {flight} | {r['rows_per_s']:.2f} ({spread}) | {r['rows_per_s'] / base['rows_per_s']:.2f} "
            f"| {r['peak_pool_tokens']} / {r['pool_tokens']} | {r['preempted']} "
            f"| {r['same_as_static']}/{len(prompts)} |"
        )
    record = run_facts(device, prompts=len(prompts), rows=args.rows, response_lengths=lengths, ways=results)
    write_results(args.out, "schedule", record, "\n".join(lines))
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
