"""Fused GPU kernels for distillation: LM head + divergence + safety boundary in one op."""

from motab_kernels.divergence import (
    DivergenceOutput,
    first_stray_index,
    fused_linear_divergence,
    logit_divergence,
)
from motab_kernels.modules import FusedLinearDivergence
from motab_kernels.paged_attention import QueryLayout, paged_attention
from motab_kernels.paged_kv import OutOfBlocksError, PagedKVCache

__all__ = [
    "DivergenceOutput",
    "FusedLinearDivergence",
    "OutOfBlocksError",
    "PagedKVCache",
    "QueryLayout",
    "first_stray_index",
    "fused_linear_divergence",
    "logit_divergence",
    "paged_attention",
]
__version__ = "0.1.0"
