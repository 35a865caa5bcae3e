"""Fused GPU kernels for distillation: LM head + divergence + safety boundary in one op, and a
paged KV cache whose rows are cut back in place.

Layout (one role per file; ``motab`` builds on this package, never the other way round):

- ``divergence/``: the fused linear divergence (see its package docstring for the files).
- ``paged_kv.py``: block pools, the device-side block stack, reserve / write / in-place truncate.
- ``paged_attention.py``: causal attention of a ragged batch of new tokens over the paged cache.
- ``ragged.py``: the one ragged-batch convention, cumulative sequence offsets (``cu_seqlens``).
- ``modules.py``: ``nn.Module`` wrappers.
- ``reference.py``: naive PyTorch ground truth, independent of the fast paths.
- ``_runtime.py``: device, interpreter and dtype policy.
"""

from motab_kernels.divergence import DivergenceOutput, first_stray_index, fused_linear_divergence, logit_divergence
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
