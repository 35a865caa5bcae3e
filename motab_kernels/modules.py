"""``nn.Module`` wrappers of the ops, for training loops that prefer modules to functions."""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from motab_kernels.divergence.api import DivergenceOutput, _linear_divergence
from motab_kernels.divergence.checks import DEFAULTS, DivergenceOptions, RowInputs, checked_settings


class FusedLinearDivergence(nn.Module):
    """Replaces "compute both logits, log_softmax, KL" in a training loop.

    The settings fixed at construction are those of ``fused_linear_divergence`` (its
    ``DivergenceOptions``, kept as ``self.options``; the math settings are checked here, so a bad
    one fails when the module is built, not at the first step). ``forward`` takes the
    two models' final hidden states and LM-head weights and returns a ``DivergenceOutput``; its
    ``loss`` is what to backpropagate.

    Example::

        criterion = FusedLinearDivergence(kind="jsd", beta=0.5, temperature=0.9)
        out = criterion(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)
        out.loss.backward()
    """

    def __init__(
        self,
        kind: str = DEFAULTS.kind,
        beta: float = DEFAULTS.beta,
        temperature: float = DEFAULTS.temperature,
        ignore_index: int = DEFAULTS.ignore_index,
        reduction: str = DEFAULTS.reduction,
        logit_scale: float | tuple[float, float] = DEFAULTS.logit_scale,
        softcap: float | tuple[float | None, float | None] | None = DEFAULTS.softcap,
        impl: str = DEFAULTS.impl,
        chunk_size: int | None = DEFAULTS.chunk_size,
    ) -> None:
        super().__init__()
        checked_settings(kind, beta, temperature, logit_scale, softcap)
        self.options = DivergenceOptions(
            kind, beta, temperature, ignore_index, reduction, logit_scale, softcap, impl, chunk_size
        )

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        target: torch.Tensor | None = None,
        *,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
        threshold: float | torch.Tensor | None = None,
        seq_len: int | torch.Tensor | list[int] | None = None,
        cu_seqlens: torch.Tensor | list[int] | None = None,
    ) -> DivergenceOutput:
        rows = RowInputs(target, weights, normalizer, threshold, seq_len, cu_seqlens)
        hidden = (student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias)
        return _linear_divergence(*hidden, self.options, rows)

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in fields(self.options))
