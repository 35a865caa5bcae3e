"""Tiny random models and an in-memory tokenizer, so the examples run offline on a CPU."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

VOCAB = 101


def tiny_model(hidden: int, layers: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    return AutoModelForCausalLM.from_config(config)


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB - 2)} | {"<pad>": VOCAB - 2, "<eos>": VOCAB - 1}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>", unk_token="t0")


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
