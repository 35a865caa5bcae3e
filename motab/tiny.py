"""Small random causal LMs and tokenizers built in memory (nothing downloaded): the one factory the
tests, benchmarks, examples and the demo's toy models build their models with.

``tiny_config`` names a shape in a few words — family (any Hugging Face ``model_type``: "qwen2",
"llama", "qwen3", "mistral", ...), vocabulary, hidden size, layers, query and K/V heads, MLP width,
tied embeddings — and passes every other field of the family's config through unchanged; what it
is not told keeps the family's default. ``tiny_model`` seeds torch's generator and builds the
random model, so the same arguments always give the same weights::

    from motab.tiny import tiny_model, tiny_tokenizer

    student = tiny_model(0, hidden=32, layers=1, vocab=101).eval()
    teacher = tiny_model(1, family="llama", hidden=64, vocab=101, initializer_range=0.4).eval()
    tokenizer = tiny_tokenizer(101)  # "t0" … "t98", "<pad>", "<eos>"

"Tiny" is the default, not a limit: the benchmarks build Qwen2.5-shaped models with it on a GPU.
Random models at the usual initializer_range (0.02) tend to repeat one token under greedy
decoding, which hides cache and position bugs; 0.2-0.4 gives varied outputs.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

# The config fields ``tiny_config`` names itself: pass these by their short names.
_NAMED = {
    "vocab_size": "vocab",
    "hidden_size": "hidden",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "intermediate_size": "intermediate",
    "tie_word_embeddings": "tie",
    "max_position_embeddings": "max_positions",
}


def tiny_config(
    family: str = "qwen2",
    *,
    vocab: int = 64,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    tie: bool = False,
    max_positions: int | None = None,
    initializer_range: float | None = None,
    **fields,
) -> PretrainedConfig:
    """The config of a ``family`` causal LM of this shape: ``intermediate`` (the MLP width) defaults
    to twice ``hidden``; ``max_positions`` and ``initializer_range`` left as None keep the family's
    defaults; ``fields`` (``head_dim``, ``sliding_window``, ``pad_token_id``, ``rope_scaling``, ...)
    go to the config as they are."""
    named = sorted(f"{field} (pass {short}=)" for field, short in _NAMED.items() if field in fields)
    if named:
        raise TypeError("tiny_config names these fields itself: " + ", ".join(named))
    shape = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden if intermediate is None else intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
    )
    if max_positions is not None:
        shape["max_position_embeddings"] = max_positions
    if initializer_range is not None:
        shape["initializer_range"] = initializer_range
    return AutoConfig.for_model(family, **shape, **fields)


def tiny_model(
    seed: int,
    config: PretrainedConfig | None = None,
    *,
    attn_implementation: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **shape,
) -> torch.nn.Module:
    """A randomly initialised causal LM (in train mode, as ``from_config`` gives it) of ``config``,
    or of ``tiny_config(**shape)``, after ``torch.manual_seed(seed)``. ``device``: built there
    directly (a large model initialises in seconds on a GPU, minutes on a host CPU); left as None,
    on the default device. ``attn_implementation`` and ``dtype`` as for ``from_config`` (None:
    its defaults)."""
    if config is None:
        config = tiny_config(**shape)
    elif shape:
        raise TypeError(f"give a config or a shape, not both (got config and {sorted(shape)})")
    options = {}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    if dtype is not None:
        options["dtype"] = dtype
    torch.manual_seed(seed)
    with nullcontext() if device is None else torch.device(device):
        return AutoModelForCausalLM.from_config(config, **options)


def word_tokenizer(words: list[str], unk: str, **special_tokens: str) -> PreTrainedTokenizerFast:
    """A whitespace-split tokenizer whose id i is ``words[i]`` (``special_tokens``: eos_token, ...)."""
    level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=level, unk_token=unk, **special_tokens)


def tiny_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word tokenizer matching a model of ``vocab`` ids: "t0" … "t{vocab-3}" (ids 0 … vocab-3; "t0"
    is also the unknown word), then "<pad>" and "<eos>"."""
    words = [f"t{i}" for i in range(vocab - 2)] + ["<pad>", "<eos>"]
    return word_tokenizer(words, "t0", pad_token="<pad>", eos_token="<eos>")


# Characters of the character-level BPE tokenizer; ids 0 and 1 are <unk> and <eos>.
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
