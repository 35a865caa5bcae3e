"""The tests' tiny random models and word-level tokenizers, from the package's one factory
(``motab.tiny``): built from configs in memory, nothing downloaded. The same arguments (seed
included) always give the same model."""

from __future__ import annotations

import torch

from motab.tiny import stop_tokenizer, tiny_model, word_tokenizer

__all__ = ["hf_greedy", "step_model", "stop_tokenizer", "tiny_qwen2", "word_tokenizer"]


def tiny_qwen2(
    seed: int,
    *,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 64,
    initializer_range: float = 0.2,
    tie_word_embeddings: bool = False,
    **config,
) -> torch.nn.Module:
    """A random Qwen2 causal LM, 4 query heads sharing 2 K/V heads, MLP twice the width, at
    initializer_range 0.2 (varied greedy outputs: see ``motab.tiny``); ``config``: other fields."""
    return tiny_model(
        seed,
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        initializer_range=initializer_range,
        tie=tie_word_embeddings,
        **config,
    )


def step_model(seed: int, tokenizer, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A tiny random model over ``tokenizer`` (``stop_tokenizer``'s) whose steps end now and then:
    its LM-head row of ".\\n\\n" is raised."""
    stop = tokenizer.convert_tokens_to_ids(".\n\n")
    m = tiny_qwen2(seed, vocab=len(tokenizer), initializer_range=0.4, tie_word_embeddings=False).to(device).eval()
    with torch.no_grad():
        m.lm_head.weight[stop] *= 3.0
    return m


def hf_greedy(model: torch.nn.Module, prefix: list[int], n: int) -> list[int]:
    """The ``n`` tokens HF ``generate`` writes greedily after ``prefix`` (one unpadded row, EOS not
    honoured): the independent oracle of what a model writes."""
    ids = torch.tensor([prefix], device=next(model.parameters()).device)
    # an explicit mask: generate would otherwise mask every prefix token equal to the pad id
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prefix) :].tolist()
