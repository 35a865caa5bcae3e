"""The demo's toy models: Qwen2-style models built from a shape by the package's factory
(``motab.tiny``; no weights downloaded), their supervised training on the task's worked solutions,
and their greedy solutions and accuracy with the paged engine. Teacher training, the warm start,
the measurements and the tuning all use these."""

from __future__ import annotations

import math
import random

import torch

from motab.evaluate import generate
from motab.tiny import tiny_config, tiny_model
from motab.toy.task import is_correct


def toy_model(tokenizer, shape: dict, seed: int) -> torch.nn.Module:
    """A random Qwen2 causal LM of ``shape`` (``motab.tiny.tiny_config``'s arguments: hidden,
    intermediate, layers, heads, kv_heads) on the toy tokenizer's ids: tied embeddings, 256
    positions, the tokenizer's pad and EOS."""
    config = tiny_config(
        vocab=len(tokenizer),
        max_positions=256,
        tie=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    return tiny_model(seed, config, attn_implementation="sdpa")


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
    """AdamW with warm-up and cosine decay on randomly drawn batches of ``problems`` (0 steps: the
    model as it is); ``log`` hears of the loss every 200 steps and at the last."""
    if steps == 0:
        model.eval()
        return
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
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    return prompts, generate(model, tokenizer, prompts, max_new_tokens=MAX_SOLUTION_TOKENS, batch_size=batch_size)


def greedy_accuracy(model, tokenizer, problems) -> float:
    """Share of problems whose greedy completion is correct."""
    _, written = greedy_solutions(model, tokenizer, problems)
    return sum(is_correct(tokenizer.decode(tokens), p) for tokens, p in zip(written, problems)) / len(problems)
