"""The toy task's tokenizer: one token per character, the step delimiter as one token, and
``<eos>``/``<pad>``/``<unk>``; a real ``PreTrainedTokenizerFast`` that saves with the models."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from motab.toy.task import OPERATIONS, STEP_DELIMITER, VARIABLES

SPECIAL = ["<pad>", "<eos>", "<unk>"]
SYMBOLS = list("0123456789") + list(VARIABLES) + list(OPERATIONS) + ["=", "?", "#", " ", "\n", STEP_DELIMITER]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL + SYMBOLS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # the delimiter first, so that a blank line is one token, then every character on its own
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n\n|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
