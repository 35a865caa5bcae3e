"""Tiny random models and an in-memory tokenizer (``motab.tiny``), so the examples run offline on a CPU."""

from __future__ import annotations

import torch

from motab.tiny import tiny_model as _tiny_model
from motab.tiny import tiny_tokenizer

VOCAB = 101


def tiny_model(hidden: int, layers: int, seed: int) -> torch.nn.Module:
    """A random Qwen2 causal LM of ``VOCAB`` ids, 4 query heads sharing 2 K/V heads."""
    return _tiny_model(seed, vocab=VOCAB, hidden=hidden, layers=layers, initializer_range=0.2)


def word_tokenizer():
    """Words "t0" … "t98", "<pad>" and "<eos>": the models' ``VOCAB`` ids."""
    return tiny_tokenizer(VOCAB)


def completion_rows(n: int, length: int = 24, prompt: int = 8, seed: int = 0) -> dict[str, list]:
    """``n`` random rows; the first ``prompt`` tokens carry no loss (label -100). ``prompts`` and
    ``prompt_attention_mask`` are what TRL's GKD generates from when it samples on-policy."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 2, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    ones = torch.ones_like(ids)
    return {
        "input_ids": ids.tolist(),
        "attention_mask": ones.tolist(),
        "labels": labels.tolist(),
        "prompts": ids[:, :prompt].tolist(),
        "prompt_attention_mask": ones[:, :prompt].tolist(),
    }


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
