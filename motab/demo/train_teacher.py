"""Trains the toy task's teacher from scratch (supervised on the task's worked solutions).

    python -m motab.demo.train_teacher --out motab/toy/assets/teacher

Reproducible: the data are the task's fixed train split, every random draw comes from ``--seed``,
and the command, seed, steps, wall time and the measured validation and test accuracy (greedy,
with the paged engine) are written to ``training.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from motab.demo.toy_models import greedy_accuracy, supervised_train, toy_model
from motab.toy.task import generate_split
from motab.toy.tokenizer import build_tokenizer

TEACHER_SHAPE = dict(hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2)  # motab.tiny.tiny_config's


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="motab/toy/assets/teacher")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-problems", type=int, default=50000)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    tokenizer = build_tokenizer()
    model = toy_model(tokenizer, TEACHER_SHAPE, args.seed)
    started = time.time()
    supervised_train(
        model,
        tokenizer,
        generate_split("train", args.train_problems),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device="cpu",
        log=print,
    )
    seconds = time.time() - started
    validation = greedy_accuracy(model, tokenizer, generate_split("validation", 500))
    test = greedy_accuracy(model, tokenizer, generate_split("test", 500))
    out = Path(args.out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    record = dict(
        command="python -m motab.demo.train_teacher " + " ".join(argv if argv is not None else sys.argv[1:]),
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        parameters=sum(p.numel() for p in model.parameters()),
        train_seconds=round(seconds, 1),
        validation_accuracy=validation,
        test_accuracy=test,
        test_problems=500,
        date=str(date.today()),
        machine=f"{platform.machine()} CPU, torch {torch.__version__}",
    )
    (out / "training.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
