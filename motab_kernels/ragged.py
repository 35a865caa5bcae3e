"""Ragged batches, one convention everywhere: cumulative sequence offsets (``cu_seqlens``), the form
flash-attn's and FLA's variable-length kernels take.

B sequences of lengths l_0 … l_(B−1), packed one after another into T = Σ l_i rows, are described by
``cu_seqlens = [0, l_0, l_0 + l_1, …, T]``: B + 1 non-decreasing integers, sequence i owning rows
``cu_seqlens[i] : cu_seqlens[i + 1]``. The fused divergence groups draft tokens by it, the paged
attention packs new tokens by it, the paged cache plans block moves by it and the rollout engine
hands ragged drafts between them by it.

The helpers take host arrays (numpy: where the host plans without waiting for the device) and
device tensors (torch) alike and answer in the same library.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Offsets = np.ndarray | torch.Tensor


def cu_seqlens(lengths: Sequence[int] | Offsets) -> Offsets:
    """``[B + 1]`` int64 offsets of sequences of ``lengths`` (a tensor stays on its device; anything
    else becomes a numpy array)."""
    if isinstance(lengths, torch.Tensor):
        return torch.nn.functional.pad(torch.cumsum(lengths.long(), 0), (1, 0))
    return np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(np.asarray(lengths, dtype=np.int64))])


def seq_lengths(offsets: Offsets) -> Offsets:
    """The B sequence lengths of ``offsets``."""
    return offsets[1:] - offsets[:-1]


def sequence_ids(offsets: Offsets, total: int | None = None) -> Offsets:
    """``[T]`` index of the sequence each packed row belongs to. ``total`` (= ``offsets[-1]``) spares a
    device sync when the caller knows it."""
    lengths = seq_lengths(offsets)
    if isinstance(offsets, np.ndarray):
        return np.repeat(np.arange(len(lengths)), lengths)
    total = int(offsets[-1]) if total is None else total
    ids = torch.arange(len(lengths), device=offsets.device)
    return torch.repeat_interleave(ids, lengths, output_size=total)


def offsets_in_sequence(offsets: Offsets, sequence: Offsets) -> Offsets:
    """``[T]`` index of each packed row within its own sequence (0 at every sequence's first row),
    given ``sequence = sequence_ids(offsets)``."""
    if isinstance(offsets, np.ndarray):
        return np.arange(len(sequence)) - offsets[sequence]
    return torch.arange(len(sequence), device=offsets.device) - offsets[sequence]
