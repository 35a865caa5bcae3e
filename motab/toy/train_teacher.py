"""Trains the toy task's teacher from scratch (supervised on the task's worked solutions).

    python -m motab.toy.train_teacher --out motab/toy/assets/teacher

Reproducible: the data are the task's fixed train split, every random draw comes from ``--seed``,
and the command, seed, steps, wall time and the measured validation and test accuracy (greedy,
with the paged engine) are written to ``training.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from motab.toy.task import generate_split, is_correct
from motab.toy.tokenizer import build_tokenizer

TEACHER_SHAPE = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)


def toy_model(tokenizer, shape: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def supervised_batch(tokenizer, problems, device):
    """Prompt + solution + EOS, padded; labels only on the solution and EOS (prompt and pad -100)."""
    rows, labels = [], []
    for problem in problems:
        prompt = tokenizer(problem.prompt)["input_ids"]
        answer = tokenizer(problem.solution)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    target = torch.tensor([r + [-100] * (width - len(r)) for r in labels], device=device)
    return ids, mask, target


def supervised_train(model, tokenizer, problems, *, steps, batch_size, lr, seed, device, log=None) -> None:
    """AdamW with warm-up and cosine decay on randomly drawn batches of ``problems``."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(steps // 20, 1)
    schedule = lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    for step in range(steps):
        ids, mask, target = supervised_batch(tokenizer, rng.sample(problems, batch_size), device)
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if log is not None and (step % 200 == 0 or step == steps - 1):
            log(f"step {step}: loss {loss.item():.4f}")
    model.eval()


# The longest solution (5 steps) is about 50 tokens; the rest is room for a model that rambles.
MAX_SOLUTION_TOKENS = 96


def greedy_solutions(model, tokenizer, problems, batch_size: int = 64) -> tuple[list[list[int]], list[list[int]]]:
    """Each problem's prompt ids and the model's greedy completion (paged engine, the model alone)."""
    from motab.evaluate import generate

    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    return prompts, generate(model, tokenizer, prompts, max_new_tokens=MAX_SOLUTION_TOKENS, batch_size=batch_size)


def greedy_accuracy(model, tokenizer, problems) -> float:
    """Share of problems whose greedy completion is correct."""
    _, written = greedy_solutions(model, tokenizer, problems)
    return sum(is_correct(tokenizer.decode(tokens), p) for tokens, p in zip(written, problems)) / len(problems)


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
        command="python -m motab.toy.train_teacher " + " ".join(argv if argv is not None else sys.argv[1:]),
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
