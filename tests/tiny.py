"""Tiny random models and word-level tokenizers for the tests: built from configs in memory,
nothing downloaded. The same arguments (seed included) always give the same model."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config


def tiny_qwen2(
    seed: int, *, hidden: int = 64, layers: int = 2, vocab: int = 64, initializer_range: float = 0.2, **config
) -> torch.nn.Module:
    """A random Qwen2 causal LM, 4 query heads sharing 2 K/V heads, MLP twice the width.

    Random models at the default initializer_range (0.02) tend to repeat one token under greedy
    decoding, which hides cache and position bugs; 0.2-0.4 gives varied outputs.
    """
    torch.manual_seed(seed)
    shape = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers)
    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(
        Qwen2Config(vocab_size=vocab, initializer_range=initializer_range, **shape, **heads, **config)
    )


def word_tokenizer(words: list[str], unk: str, **special_tokens: str) -> PreTrainedTokenizerFast:
    """A whitespace-split tokenizer whose id i is ``words[i]`` (``special_tokens``: eos_token, ...)."""
    level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=level, unk_token=unk, **special_tokens)


# Characters of the tiny BPE tokenizer; ids 0 and 1 are <unk> and <eos>.
_CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,=+#") + ["\n"]


def stop_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level BPE tokenizer (47 tokens) with two merges, as Qwen's tokenizer has them:
    "\\n\\n" and ".\\n\\n" are single tokens, so a step's stop string ".\\n\\n" may be one token
    (".\\n\\n"), two (".", "\\n\\n") or three; its decoder joins tokens as written."""
    vocab = {"<unk>": 0, "<eos>": 1}
    for piece in [*_CHARACTERS, "\n\n", ".\n\n"]:
        vocab[piece] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "\n"), (".", "\n\n")], unk_token="<unk>"))
    bpe.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>")


def hf_greedy(model: torch.nn.Module, prefix: list[int], n: int) -> list[int]:
    """The ``n`` tokens HF ``generate`` writes greedily after ``prefix`` (one unpadded row, EOS not
    honoured): the independent oracle of what a model writes."""
    ids = torch.tensor([prefix], device=next(model.parameters()).device)
    # an explicit mask: generate would otherwise mask every prefix token equal to the pad id
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prefix) :].tolist()
