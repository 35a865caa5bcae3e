"""``nn.Module`` wrappers of the ops, for training loops that prefer modules to functions."""

from __future__ import annotations

import torch
from torch import nn

from motab_kernels.divergence import DivergenceOutput, fused_linear_divergence
from motab_kernels.divergence.checks import checked_settings


class FusedLinearDivergence(nn.Module):
    """Replaces "compute both logits, log_softmax, KL" in a training loop.

    The settings fixed at construction are those of ``fused_linear_divergence`` (checked here,
    so a bad option fails when the module is built, not at the first step). ``forward`` takes the
    two models' final hidden states and LM-head weights and returns a ``DivergenceOutput``; its
    ``loss`` is what to backpropagate.

    Example::

        criterion = FusedLinearDivergence(kind="jsd", beta=0.5, temperature=0.9)
        out = criterion(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)
        out.loss.backward()
    """

    def __init__(
        self,
        kind: str = "jsd",
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        logit_scale: float | tuple[float, float] = 1.0,
        softcap: float | tuple[float | None, float | None] | None = None,
        impl: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        options = _arguments(locals())
        super().__init__()
        checked_settings(kind, beta, temperature, logit_scale, softcap)
        self.options = options

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
        return fused_linear_divergence(**_arguments(locals()), **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _arguments(scope: dict) -> dict:
    """A method's arguments by name, from its ``locals()`` on entry: the module forwards them to
    ``fused_linear_divergence`` under the same names."""
    return {name: value for name, value in scope.items() if name not in ("self", "__class__")}
