"""Sampling with per-row counter-based noise: a row's draw depends on nothing but its seed and
its own counter, so a row samples the same whatever else is in the batch (and a row re-entering a
later batch samples what it would have)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from motab.config import SamplingConfig

# splitmix64's constants, as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX_2 = -7723592293110705685  # 0x94D049BB133111EB


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _uniforms(seeds: torch.Tensor, counters: torch.Tensor, width: int) -> torch.Tensor:
    """``[rows, width]`` uniforms in (0, 1): splitmix64 of (seed, counter, column), counter-based so
    that a row's numbers depend on nothing but its own seed and counter."""
    columns = torch.arange(width, device=seeds.device, dtype=torch.int64)
    x = (seeds * _GOLDEN + counters)[:, None] * _GOLDEN + columns[None, :]
    x = (x ^ _logical_shift_right(x, 30)) * _MIX_1
    x = (x ^ _logical_shift_right(x, 27)) * _MIX_2
    x = x ^ _logical_shift_right(x, 31)
    return (_logical_shift_right(x, 11).to(torch.float64) + 0.5) / float(1 << 53)  # 53 random bits


def sample_tokens(
    logits: torch.Tensor, sampling: SamplingConfig, seeds: Sequence[int], counters: Sequence[int]
) -> torch.Tensor:
    """One token per row of ``logits`` [rows, V]: softmax(logits / T) restricted to the top-k and
    top-p sets, drawn by the Gumbel-max trick with per-row counter-based noise (temperature 0 is
    greedy)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, -1)
        drop = probs.cumsum(-1) - probs >= sampling.top_p  # keep the smallest prefix reaching p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)
    device = logits.device
    uniforms = _uniforms(torch.tensor(seeds, device=device), torch.tensor(counters, device=device), logits.shape[-1])
    gumbel = -torch.log(-torch.log(uniforms)).to(logits.dtype)
    return (logits + gumbel).argmax(-1)


def logprobs_of(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at each row's target."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(1, targets.to(logp.device).long()[:, None])[:, 0]
