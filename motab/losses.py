"""The distillation loss on mixed trajectories (student and teacher tokens), for the trainer.

A thin layer over ``motab_kernels.FusedLinearDivergence`` — the math lives there, once. What this
adds is which positions get a loss and with what weight:

- position i of ``prompt + response`` predicts token i + 1; only response tokens are targets;
- a response token written by the student gets weight ``student_weight``, one written by the
  teacher ``teacher_weight`` (set 0 to train on the student's own tokens only);
- prompt tokens, padding and anything discarded by a backtrack get no loss (discarded spans are
  not in the committed sequence at all);
- the loss is Σ_i w_i · d_i over positions with w_i > 0, divided by their count (or by
  ``normalizer``, e.g. the count over all gradient-accumulation micro-batches). No other term.

The divergence runs at ``temperature`` (default 1.0), an option of its own: never the sampling
temperature by accident. No T² factor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from motab_kernels import DivergenceOutput, FusedLinearDivergence

# Source codes of the positions of a training sequence.
NO_LOSS, STUDENT, TEACHER = 0, 1, 2
_SOURCE_CODES = {"student": STUDENT, "teacher": TEACHER}


def trajectory_targets(prompt: Sequence[int], tokens: Sequence[int], sources: Sequence[str]):
    """For ``prompt + tokens``: the input ids, each position's target (the next token) and the
    source code of that target (``NO_LOSS`` inside the prompt and at the last position)."""
    if len(tokens) != len(sources):
        raise ValueError(f"{len(tokens)} tokens but {len(sources)} sources")
    if not prompt:
        raise ValueError("a training sequence needs a prompt of at least one token")
    ids = list(prompt) + list(tokens)
    targets = ids[1:] + [0]
    codes = [NO_LOSS] * (len(prompt) - 1) + [_SOURCE_CODES[s] for s in sources] + [NO_LOSS]
    return ids, targets, codes


class TrajectoryDistillationLoss(nn.Module):
    """Fused divergence between teacher and student over the response tokens of trajectories.

    Args:
        kind, beta: ``"fkl"`` (KL(teacher‖student)), ``"rkl"`` or ``"jsd"`` with mixture β.
        temperature: of both distributions inside the loss (default 1.0).
        student_weight, teacher_weight: weights of positions whose target the student / the
            teacher wrote.
        impl, chunk_size: passed to the fused op.
    """

    def __init__(
        self,
        kind: str = "fkl",
        beta: float = 0.5,
        temperature: float = 1.0,
        student_weight: float = 1.0,
        teacher_weight: float = 1.0,
        impl: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if student_weight < 0 or teacher_weight < 0 or student_weight + teacher_weight == 0:
            raise ValueError(f"source weights must be ≥ 0 and not both 0, got {student_weight}, {teacher_weight}")
        self.divergence = FusedLinearDivergence(
            kind=kind, beta=beta, temperature=temperature, impl=impl, chunk_size=chunk_size, reduction="mean"
        )
        self.student_weight, self.teacher_weight = student_weight, teacher_weight

    def position_weights(self, sources: torch.Tensor) -> torch.Tensor:
        """The weight of each position from its source code (0 where no loss applies)."""
        weights = torch.zeros(sources.shape, device=sources.device, dtype=torch.float32)
        weights = weights.masked_fill(sources == STUDENT, self.student_weight)
        return weights.masked_fill(sources == TEACHER, self.teacher_weight)

    def count(self, sources: torch.Tensor) -> int:
        """How many positions carry a loss: the default denominator, and the one to sum over
        micro-batches (and ranks) for ``normalizer``."""
        return int((self.position_weights(sources) > 0).sum())

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_head: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_head: torch.Tensor,
        targets: torch.Tensor,
        sources: torch.Tensor,
        normalizer: float | torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ) -> DivergenceOutput:
        """``*_hidden`` ``[..., D]`` final hidden states at every position, ``*_head`` the LM-head
        weights and ``*_bias`` their biases (``motab.models.lm_head``: cut to the shared vocabulary),
        ``targets`` and ``sources`` ``[...]`` from ``trajectory_targets`` (padded with ``NO_LOSS``).
        Returns the fused op's output; its ``loss`` is the value to backpropagate."""
        if sources.shape != targets.shape:
            raise ValueError(f"sources {tuple(sources.shape)} and targets {tuple(targets.shape)} differ in shape")
        weights = self.position_weights(sources)
        counted = weights > 0
        return self.divergence(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            torch.where(counted, targets, -100),
            weights=weights.reshape(-1),
            normalizer=normalizer,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
        )
