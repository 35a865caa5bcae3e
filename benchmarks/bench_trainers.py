"""A GKD loss step with and without the fused drop-in: peak memory and time.

The step is what the drop-in changes: student forward, teacher forward (no gradient), the loss,
and the student's backward; the optimizer is left out (identical in both). ``trl`` runs TRL's own
``GKDTrainer.compute_loss`` (full logits of both models, ``generalized_jsd_loss``); ``fused``
runs ``motab.integrations.hf.distillation_loss`` (what ``FusedGKDTrainer`` calls), same β, same
batch. GPU: random Qwen2.5-1.5B-shaped student and 7B-shaped teacher in bf16; CPU: tiny models
(labelled CPU). Writes ``trainers.json`` and ``trainers.md`` under ``--out``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from _common import bench_parser, parse_bench_args, run_facts, write_results  # noqa: E402
from _models import student_and_teacher  # noqa: E402
from _timing import median_seconds, sync  # noqa: E402

from motab.integrations.hf import distillation_loss  # noqa: E402


def trl_loss_fn(student, teacher, beta):
    """TRL's compute_loss on the same models, or None where TRL is not installed."""
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError:
            return None
    # compute_loss only reads these attributes of the trainer
    host = SimpleNamespace(teacher_model=teacher, beta=beta, generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
    return lambda inputs: GKDTrainer.compute_loss(host, student, inputs)


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=3)
    args, device = parse_bench_args(parser, argv)
    on_gpu = device.type == "cuda"
    student, teacher, vocab, dtype = student_and_teacher(device, cpu_vocab=4096)
    student.train()
    batch, seq_len = args.batch or (4 if on_gpu else 4), args.seq_len or (2048 if on_gpu else 256)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100  # the prompt carries no loss
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    meta = run_facts(device, dtype=str(dtype), batch=batch, seq_len=seq_len, vocab=vocab)
    losses = {
        "trl": trl_loss_fn(student, teacher, args.beta),
        "fused": lambda inputs: distillation_loss(student, teacher, inputs, kind="jsd", beta=args.beta).loss,
    }
    lines = [
        f"GKD loss step on {meta['card']}, {dtype}, batch {batch} × {seq_len} tokens, vocab {vocab}, {meta['date']}",
        "",
        "| loss | step ms | peak GiB | loss value |",
        "|---|---|---|---|",
    ]
    print("\n".join(lines))
    rows = []
    for name, loss_fn in losses.items():
        if loss_fn is None:
            print(f"# {name}: not installed, row skipped")
            continue

        def step(loss_fn=loss_fn):
            student.zero_grad(set_to_none=True)
            loss = loss_fn(inputs)
            loss.backward()
            return loss

        try:
            value = float(step().detach())
            seconds = median_seconds(step, device, args.reps, warmup=1)
            peak = None
            if on_gpu:
                student.zero_grad(set_to_none=True)
                sync(device)
                torch.cuda.reset_peak_memory_stats()
                step()
                sync(device)
                peak = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError:
            value = seconds = peak = None
            torch.cuda.empty_cache()
        rows.append(dict(loss=name, ms=None if seconds is None else seconds * 1e3, peak_GiB=peak, value=value))
        cells = [
            f"{x:.4g}" if isinstance(x, float) else "OOM" if value is None else "—"
            for x in (rows[-1]["ms"], peak, value)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    write_results(args.out, "trainers", dict(meta=meta, rows=rows), "\n".join(lines))


if __name__ == "__main__":
    main()
