"""Chunk passes: one sweep over row chunks of a logit source, the row math on each chunk and, when a
gradient is wanted, the chunk's logit gradient handed back to the source.

Two sources share the one pass: ``HiddenStates`` (final hidden states and LM heads: each chunk's
logits come from two GEMMs into a bounded fp32 buffer, and the chunk's gradient is multiplied
straight into d hidden, d weight and d bias) and ``LogitsInMemory`` (``[N, V]`` logits that exist
anyway, as while decoding: chunks are slices, the gradient is written in place). A source's
``tensors`` are what autograd sees; its ``gradients`` line up with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from motab_kernels._runtime import addmm_wide_, matmul_wide
from motab_kernels.divergence.checks import Settings
from motab_kernels.divergence.rows import RowStats, run_rows

# Scratch budget of one chunk of rows. The triton path holds per logit element fp32 student and
# teacher logits plus a gradient tile (≤ 10 bytes); the chunked path about eight fp32 temporaries
# (logits, log-probs, probabilities, the mixture and its products). 768 MiB keeps scratch under
# the 1 GB target at a 152k vocabulary while still giving chunks of ~500 rows, large enough for
# the logit GEMMs to stay compute-bound (each chunk re-reads both weight matrices).
CHUNK_BUDGET_BYTES = 768 << 20
_TRITON_BYTES_PER_LOGIT = 10
_CHUNKED_BYTES_PER_LOGIT = 32
# Chunks are rounded to a multiple of this so the GEMMs see tile-friendly row counts.
_CHUNK_ROW_MULTIPLE = 32

Gradients = list[torch.Tensor | None]


class LogitSource:
    """Where a pass gets each chunk's logits and where the chunk's logit gradient goes.

    ``tensors`` are what autograd sees (the student's first); ``student_tensors()`` those that may
    want a gradient; ``zero_gradients`` makes one accumulator (or None) per tensor, which
    ``gradient_buffer`` and ``add_gradient`` fill chunk by chunk.
    """

    tensors: tuple[torch.Tensor | None, ...]
    num_rows: int
    vocab: int

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the student's logits are computed in."""
        return self.tensors[0].dtype


class HiddenStates(LogitSource):
    """Logits from final hidden states ``[N, D]`` and LM heads ``[V, D]`` (+ bias), chunk by chunk."""

    def __init__(self, hs, ws, bs, ht, wt, bt) -> None:
        self.tensors = (hs, ws, bs, ht, wt, bt)
        self.num_rows, self.vocab = hs.shape[0], ws.shape[0]

    @classmethod
    def of(cls, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias):
        """Rows flattened, each model's GEMM operands in its matmul dtype, the teacher detached."""
        dtype, teacher_dtype = (
            matmul_dtype(student_hidden, student_weight),
            matmul_dtype(teacher_hidden, teacher_weight),
        )
        hs = student_hidden.reshape(-1, student_hidden.shape[-1]).to(dtype)
        ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(teacher_dtype).detach()
        bt = None if teacher_bias is None else teacher_bias.detach()
        return cls(hs, student_weight.to(dtype), student_bias, ht, teacher_weight.to(teacher_dtype).detach(), bt)

    def student_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.tensors[:3]

    def chunk(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        hs, ws, bs, ht, wt, bt = self.tensors
        return _chunk_logits(hs[start:end], ws, bs), _chunk_logits(ht[start:end], wt, bt)

    def full_logits(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``[N, V]`` logits, as the naive way computes them (garbage in ignored rows would
        reach d weight through 0·NaN, so those rows are zeroed first)."""
        hs, ws, bs, ht, wt, bt = self.tensors
        rows = valid[:, None]
        return F.linear(torch.where(rows, hs, 0.0), ws, bs), F.linear(torch.where(rows, ht, 0.0), wt, bt)

    def zero_gradients(self, dtype: torch.dtype) -> Gradients:
        """d hidden in its dtype; d weight and d bias as ``dtype`` accumulators over the chunks."""
        hs, ws, bs = self.student_tensors()
        grad_bs = None if bs is None else torch.zeros(self.vocab, device=ws.device, dtype=dtype)
        return [torch.empty_like(hs), torch.zeros(ws.shape, device=ws.device, dtype=dtype), grad_bs, None, None, None]

    def gradient_buffer(self, grads: Gradients, start: int, end: int, s: torch.Tensor) -> torch.Tensor:
        # The gradient overwrites the student logits in place when both are of the weight's dtype.
        weight_dtype = self.tensors[1].dtype
        return s if weight_dtype == s.dtype else torch.empty(s.shape, device=s.device, dtype=weight_dtype)

    def add_gradient(self, grads: Gradients, start: int, end: int, grad_logits, row_scale) -> None:
        hs, ws, _ = self.student_tensors()
        grad_hs, grad_ws, grad_bs = grads[:3]
        grad_hs[start:end] = grad_logits @ ws
        # Rows without loss get zero gradient logits, but 0·NaN is NaN: padding rows whose hidden
        # states are garbage must not reach the weight gradient.
        h_s = torch.where(row_scale[:, None] != 0, hs[start:end], 0.0)
        addmm_wide_(grad_ws, grad_logits.t(), h_s)
        if grad_bs is not None:
            grad_bs += grad_logits.sum(0, dtype=grad_bs.dtype)


class LogitsInMemory(LogitSource):
    """Student and teacher logits ``[N, V]`` already in memory; the gradient goes to the student's."""

    def __init__(self, s, t) -> None:
        self.tensors = (s, t)
        self.num_rows, self.vocab = s.shape

    @classmethod
    def of(cls, student_logits, teacher_logits):
        vocab = student_logits.shape[-1]
        return cls(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab).detach())

    def student_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.tensors[:1]

    def chunk(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.tensors
        return s[start:end], t[start:end]

    def full_logits(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors

    def zero_gradients(self, dtype: torch.dtype) -> Gradients:
        return [torch.empty_like(self.tensors[0]), None]

    def gradient_buffer(self, grads: Gradients, start: int, end: int, s: torch.Tensor) -> torch.Tensor:
        return grads[0][start:end]

    def add_gradient(self, grads: Gradients, start: int, end: int, grad_logits, row_scale) -> None:
        """Nothing to add: the row math wrote the chunk's gradient in place."""


@torch.no_grad()
def divergence_pass(
    source: LogitSource,
    target: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    settings: Settings,
    impl: str,
    chunk_size: int | None,
    stats_dtype: torch.dtype,
) -> tuple[RowStats, Gradients | None]:
    """One sweep over row chunks: per-row results and, with ``row_scale`` (the factor of each row's
    divergence in the loss), the gradients of the source's tensors (teacher entries None)."""
    n, vocab = source.num_rows, source.vocab
    out = RowStats.empty(n, source.device, stats_dtype)
    grads = None if row_scale is None else source.zero_gradients(stats_dtype)
    step = chunk_rows(n, vocab, impl, chunk_size)
    for start in range(0, n, step):
        end = min(start + step, n)
        s, t = source.chunk(start, end)
        scale = None if row_scale is None else row_scale[start:end]
        grad_logits = None if grads is None else source.gradient_buffer(grads, start, end, s)
        chunk_target = None if target is None else target[start:end]
        run_rows(impl, s, t, chunk_target, scale, grad_logits, settings, out.rows(start, end))
        if grads is not None:
            source.add_gradient(grads, start, end, grad_logits, scale)
    return out, grads


def chunk_rows(n: int, vocab: int, impl: str, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else equal chunks within the scratch budget (a
    short last chunk would pay a full read of both weight matrices for few rows)."""
    if chunk_size is not None:
        return chunk_size
    per_row = vocab * (_TRITON_BYTES_PER_LOGIT if impl == "triton" else _CHUNKED_BYTES_PER_LOGIT)
    budget_rows = max(CHUNK_BUDGET_BYTES // per_row, 1)
    rows = triton.cdiv(n, triton.cdiv(n, budget_rows))
    rounded = triton.cdiv(rows, _CHUNK_ROW_MULTIPLE) * _CHUNK_ROW_MULTIPLE
    return max(min(rounded if rounded <= budget_rows else rows, n), 1)


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would compute in: autocast's when it is on, else the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = matmul_wide(hidden, weight.t())
    if bias is not None:
        logits += bias.to(logits.dtype)
    return logits
