"""Fused GPU kernels for distillation: LM head + divergence + safety boundary in one op."""

from motab_kernels.divergence import (
    DivergenceOutput,
    first_stray_index,
    fused_linear_divergence,
    logit_divergence,
)
from motab_kernels.modules import FusedLinearDivergence

__all__ = [
    "DivergenceOutput",
    "FusedLinearDivergence",
    "first_stray_index",
    "fused_linear_divergence",
    "logit_divergence",
]
__version__ = "0.1.0"
