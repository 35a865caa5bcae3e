"""Hugging Face causal LMs running on motab's paged KV cache, with no model code copied.

``PagedModel`` registers an attention function with ``transformers.AttentionInterface`` and points
the model's config at it. The function receives each layer's new query/key/value after RoPE; when
the forward carries the paged state (keyword ``motab_paged``) it writes the new K/V into the paged
cache and attends over it there, otherwise it calls the model's original attention with the mask
the original would get, so the same model object still trains with gradients and runs
``generate``. All rows' new tokens travel packed in one ``[1, total]`` sequence with explicit
per-token positions (``motab_kernels.ragged``'s offsets), so ragged batches need no padding.

``final_hidden_states`` is the other way this layer runs a model: an ordinary (training) forward
that returns the final hidden states without computing any logits, for the fused loss; ``lm_head``
gives the head they go with, cut to the shared vocabulary.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from motab.graphs import DecodeGraphs
from motab_kernels import ragged
from motab_kernels.paged_attention import QueryLayout, paged_attention
from motab_kernels.paged_kv import PagedKVCache

PAGED_KWARG = "motab_paged"
_PREFIX = "motab_paged_"


@dataclass
class PagedForward:
    """The paged state of one forward: what every layer's attention call needs."""

    model: PagedModel
    slots: torch.Tensor
    layout: QueryLayout
    # a captured decode step must launch the same kernels at every replay: no split planned on the host
    split: str = "auto"

    def attend(self, module, query, key, value, scaling, sliding_window) -> tuple[torch.Tensor, None]:
        cache = self.model.cache
        layer = module.layer_idx
        # [1, heads, tokens, head_dim] → [tokens, heads, head_dim]
        cache.write(layer, self.slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
        out = paged_attention(
            query[0].transpose(0, 1),
            cache.key_cache[layer],
            cache.value_cache[layer],
            cache.block_table,
            self.layout,
            scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
            sliding_window=sliding_window,
            impl=self.model.attention_impl,
            split=self.split,
        )
        self.model.paged_attention_calls += 1
        return out.unsqueeze(0), None


def register_paged_attention(original: str) -> str:
    """Registers (once) the paged attention wrapping ``original`` ("sdpa", "eager", ...) and its
    mask function; returns the name to put in ``config._attn_implementation``."""
    name = _PREFIX + original
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    original_mask = ALL_MASK_ATTENTION_FUNCTIONS.get(original)
    if original_mask is None:
        raise ValueError(f"attention implementation {original!r} has no mask function in transformers to fall back on")

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        paged = kwargs.pop(PAGED_KWARG, None)
        if paged is None:
            fallback = ALL_ATTENTION_FUNCTIONS.get(original) or _eager_attention_of(module)
            return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        for unsupported in ("softcap", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(
                    f"paged attention does not implement {unsupported!r} (attention soft-cap/sinks)"
                )
        return paged.attend(module, query, key, value, scaling, kwargs.get("sliding_window"))

    AttentionInterface.register(name, attention)
    # the original's masks outside a paged forward (a paged forward passes its own 4-D mask: none is built)
    AttentionMaskInterface.register(name, original_mask)
    return name


def _eager_attention_of(module):
    """The model family's own eager attention (HF defines one per modeling file)."""
    return sys.modules[type(module).__module__].eager_attention_forward


class PagedModel:
    """An unmodified HF causal LM (Llama, Qwen2, Qwen3, Mistral families) and its own paged cache.

    Args:
        model: the ``*ForCausalLM``; its config is pointed at the paged attention (the model keeps
            working everywhere else: training, ``generate``).
        max_rows: sequences held at once (rows of the block table).
        max_tokens: tokens the pool holds over all rows; blocks for one partial block per row
            are added on top (unless ``pool_blocks`` is given).
        pool_blocks: the pool's size in blocks, exactly (``max_tokens`` is then ignored).
        block_size: tokens per cache block.
        max_seq_len: longest row (default: the config's ``max_position_embeddings``).
        attention_impl: ``"triton"``, ``"torch"`` or ``"auto"`` (triton on CUDA).
        cache_impl: the cache's block bookkeeping, the same choices (see ``PagedKVCache``).
        decode_graphs: ``"cuda"`` replays steps that feed one token to every row (decoding) from
            CUDA graphs captured per bucket of row counts (``motab.graphs``); ``"eager"`` runs
            those steps padded to the bucket as a graph would, without capturing (tests); ``"off"``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_rows: int,
        max_tokens: int = 0,
        block_size: int = 16,
        max_seq_len: int | None = None,
        pool_blocks: int | None = None,
        attention_impl: str = "auto",
        cache_impl: str = "auto",
        decode_graphs: str = "off",
    ) -> None:
        config = model.config
        for attribute in ("final_logit_softcapping", "logits_scaling", "attn_logit_softcapping"):
            if getattr(config, attribute, None) not in (None, 1.0):
                raise NotImplementedError(f"{type(model).__name__} uses {attribute}, which PagedModel does not apply")
        original = config._attn_implementation or "eager"
        if original.startswith(_PREFIX):
            original = original[len(_PREFIX) :]
        config._attn_implementation = register_paged_attention(original)
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        parameter = next(model.parameters())
        kv_heads, head_dim = attention_shape(config)
        self.vocab_size = config.vocab_size
        max_seq_len = max_seq_len or getattr(config, "max_position_embeddings", max_tokens)
        self.cache = PagedKVCache(
            config.num_hidden_layers,
            kv_heads,
            head_dim,
            num_blocks=pool_blocks if pool_blocks is not None else -(-max_tokens // block_size) + max_rows,
            block_size=block_size,
            max_rows=max_rows,
            max_blocks_per_row=-(-max_seq_len // block_size),
            dtype=parameter.dtype,
            device=parameter.device,
            impl=cache_impl,
        )
        self.attention_impl = attention_impl
        # layer calls that ran on the paged cache (a graph replay makes none: its calls ran at capture)
        self.paged_attention_calls = 0
        # the attention mask of every paged forward: the paged kernels mask by position themselves
        self._no_mask = torch.zeros(1, 1, 0, 0, dtype=torch.bool, device=parameter.device)
        if decode_graphs not in ("off", "cuda", "eager"):
            raise ValueError(f"unknown decode_graphs {decode_graphs!r}; expected 'off', 'cuda' or 'eager'")
        self.decode_graphs = None if decode_graphs == "off" else DecodeGraphs(self, decode_graphs)

    @property
    def device(self) -> torch.device:
        return self.cache.device

    @property
    def max_rows(self) -> int:
        """Rows (sequences) the cache holds at once."""
        return self.cache.max_rows

    @property
    def num_free_blocks(self) -> int:
        """Blocks of the pool no row holds."""
        return self.cache.num_free_blocks

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds (all rows together)."""
        return self.cache.num_blocks * self.cache.block_size

    def lengths(self, rows: Sequence[int] | None = None) -> list[int]:
        """Tokens each row holds in the cache (host values, no sync)."""
        return self.cache.lengths(rows)

    def blocks_needed(self, token_counts: Sequence[int]) -> int:
        """Cache blocks that rows holding ``token_counts[i]`` tokens each take."""
        return self.cache.blocks_for(list(token_counts))

    def blocks_available(self, rows: Sequence[int]) -> int:
        """Free cache blocks once ``rows`` are emptied (as a rollout empties its rows first)."""
        return self.cache.num_free_blocks + self.blocks_needed(self.cache.lengths(list(rows)))

    @torch.no_grad()
    def extend(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int] | torch.Tensor] | torch.Tensor
    ) -> torch.Tensor:
        """Feeds ``tokens[i]`` to row ``rows[i]`` (positions continue from the row's length) and
        returns the final hidden states of all new tokens, packed ``[total, hidden]`` in the order
        given. ``tokens`` is one sequence per row (rows with none are allowed), or a
        ``[len(rows), n]`` tensor: n tokens for every row, e.g. the ids just sampled on the device,
        used where they are and not range-checked (checking them there would make the host wait
        for the device). On any error the cache is left as it was."""
        rows = list(rows)
        if len(tokens) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(tokens)} token sequences")
        flat, counts = self._packed_ids(tokens)
        starts = self.cache.lengths(rows)
        slots = self.cache.reserve(rows, counts)
        try:
            if not flat.numel():
                return torch.zeros(0, self.model.config.hidden_size, device=self.device)
            flat = flat.to(self.device)
            if self.decode_graphs is not None and set(counts) == {1} and self.decode_graphs.covers(len(rows)):
                return self.decode_graphs.step(rows, flat, starts, slots)
            layout = QueryLayout.build(rows, starts, ragged.cu_seqlens(counts), self.device)
            return self.forward_packed(flat, layout, slots)
        except BaseException:
            self.cache.truncate(rows, starts)
            raise

    def forward_packed(
        self, ids: torch.Tensor, layout: QueryLayout, slots: torch.Tensor, split: str = "auto"
    ) -> torch.Tensor:
        """The decoder over packed new tokens ``ids`` (device) laid out by ``layout``, their K/V
        written to ``slots`` (already reserved): final hidden states ``[tokens, hidden]``."""
        out = self.decoder(
            input_ids=ids[None],
            position_ids=layout.positions.long()[None],
            # a 4-D mask is taken as given: HF builds no mask for the packed sequence (O(total²),
            # and its packed-sequence detection reads the positions back to the host)
            attention_mask=self._no_mask,
            use_cache=False,
            **{PAGED_KWARG: PagedForward(self, slots, layout, split)},
        )
        return out.last_hidden_state[0]

    def _packed_ids(self, tokens) -> tuple[torch.Tensor, list[int]]:
        """All rows' ids in one 1-D tensor, and each row's count; ids given as sequences are
        range-checked on the host (a token tensor is used as it is)."""
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 2 or tokens.is_floating_point():
                shape = tuple(tokens.shape)
                raise ValueError(f"a token tensor must hold integer ids [rows, n], got {shape} {tokens.dtype}")
            return tokens.reshape(-1).long(), [tokens.shape[1]] * tokens.shape[0]
        pieces = [t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else list(t) for t in tokens]
        ids = [i for piece in pieces for i in piece]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}")
        return torch.tensor(ids, dtype=torch.long), [len(piece) for piece in pieces]

    def logits(self, hidden: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
        """LM-head logits of final hidden states, over the first ``vocab`` ids (all by default)."""
        if vocab is None or vocab == self.lm_head.weight.shape[0]:
            return self.lm_head(hidden)
        return torch.nn.functional.linear(hidden, *lm_head(self, vocab))

    def truncate(self, rows: Sequence[int], new_lens: Sequence[int]) -> None:
        """Cuts rows back to ``new_lens`` tokens in place (see ``PagedKVCache.truncate``)."""
        self.cache.truncate(list(rows), list(new_lens))

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Empties rows (all by default) for reuse."""
        self.cache.reset(None if rows is None else list(rows))


# The positions whose logits a forward computes: none.
_NO_POSITIONS = torch.zeros(0, dtype=torch.long)


def attention_shape(config) -> tuple[int, int]:
    """A transformers config's KV heads and head size."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def kv_bytes_per_token(config, element_bytes: int) -> int:
    """Bytes of K and V one token takes in a paged cache over every layer of the model."""
    kv_heads, head_dim = attention_shape(config)
    return config.num_hidden_layers * kv_heads * head_dim * 2 * element_bytes


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP, accelerate and DeepSpeed wrappers
        model = model.module
    return model


def final_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """``model``'s final (normed) hidden states ``[B, L, D]``, from a forward that computes no
    logits (the LM head they go with: ``lm_head``)."""
    inner = _unwrap(model)
    decoder = inner.get_decoder()
    captured = []
    hook = decoder.register_forward_hook(lambda _module, _args, output: captured.append(output[0]))
    try:
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_to_keep=_NO_POSITIONS.to(input_ids.device),
            use_cache=False,
        )
    except TypeError as error:
        raise TypeError(
            f"{type(inner).__name__}.forward does not take logits_to_keep, which the fused distillation loss needs "
            "to skip the LM head (transformers ≥ 4.50 causal LMs do)"
        ) from error
    finally:
        hook.remove()
    if output.logits is not None and output.logits.shape[-2] != 0:
        raise RuntimeError(f"{type(inner).__name__} computed logits despite logits_to_keep=[]; refusing to go on")
    return captured[-1]


def lm_head(model, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head of ``model`` (an HF causal LM, a DDP-style wrapper of one, or a PagedModel) as
    ``(weight, bias)``, both cut to the first ``vocab`` rows: the tokenizer's vocabulary, which the
    heads of real families pad past (Qwen2.5-7B's has 152,064 rows and 1.5B's 151,936 for a
    151,665-token tokenizer), so that two models are scored over the same ids. The bias is kept
    when the head has one; the cut rows are views, so gradients reach the head's own rows."""
    head = model.lm_head if isinstance(model, PagedModel) else _unwrap(model).get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab is None:
        return weight, bias
    if not 0 < vocab <= weight.shape[0]:
        raise ValueError(f"the vocabulary of {vocab} ids does not fit an LM head of {weight.shape[0]} rows")
    return weight[:vocab], None if bias is None else bias[:vocab]


def shared_vocab(student, teacher, tokenizer=None, vocab_size: int | None = None) -> int:
    """The ids both models are scored and sampled over: ``vocab_size``, else the tokenizer's
    length; without either, the two LM heads must have the same number of rows. Refuses a
    vocabulary that does not fit a head, naming both heads."""
    rows = [lm_head(m)[0].shape[0] for m in (student, teacher)]
    vocab = vocab_size or (len(tokenizer) if tokenizer is not None else None)
    if vocab is None:
        if rows[0] != rows[1]:
            raise ValueError(
                f"vocabulary mismatch: the student's LM head has {rows[0]} rows, the teacher's {rows[1]}; pass the "
                "tokenizer (or its vocabulary size) to score over the shared ids only"
            )
        return rows[0]
    if vocab > min(rows):
        raise ValueError(
            f"the tokenizer's {vocab} ids do not fit the LM heads (student {rows[0]} rows, teacher {rows[1]}): "
            "these models were not trained with this tokenizer"
        )
    return vocab


@torch.no_grad()
def greedy_decode(paged: PagedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt on the paged cache (rows 0..B-1, emptied first)."""
    rows = list(range(len(prompts)))
    paged.reset(rows)
    hidden = paged.extend(rows, prompts)
    last = torch.cumsum(torch.tensor([len(p) for p in prompts]), 0) - 1
    next_tokens = paged.logits(hidden[last.to(hidden.device)]).argmax(-1)
    generated = [[] for _ in rows]
    for step in range(max_new_tokens):
        for out, token in zip(generated, next_tokens.tolist()):
            out.append(token)
        if step + 1 < max_new_tokens:
            next_tokens = paged.logits(paged.extend(rows, [[t] for t in next_tokens.tolist()])).argmax(-1)
    return generated


def load_tokenizer(name: str | Path):
    """The tokenizer of a model folder or cached hub id, from disk only. One saved as a plain
    ``tokenizers`` tokenizer (``TokenizersBackend`` / ``PreTrainedTokenizerFast``, as the toy task's
    and the tests' are) loads as such: AutoTokenizer would build the model family's tokenizer class
    from config.json instead, which tokenises differently."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(name) / "tokenizer_config.json"
    if config.exists():
        declared = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(str(name), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(name), local_files_only=True)
