"""Naive PyTorch versions of the ops: ground truth for the tests and the benchmarks' baseline.

Everything here materialises full ``[N, V]`` tensors and lets autograd derive the gradients. The
divergences follow TRL's ``GKDTrainer.generalized_jsd_loss`` formula term by term (log-softmax,
log-space mixture), so they can be checked against it and against float64 runs of themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LogitTransform:
    """How raw LM-head outputs become the logits a softmax sees: ``cap·tanh(scale·x / cap) / T``.

    ``scale`` multiplies first (Granite-style logit scaling), then the optional soft-cap
    (Gemma-style ``final_logit_softcapping``), then the temperature divides.
    """

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits if self.scale == 1.0 else logits * self.scale
        if self.softcap is not None:
            x = self.softcap * torch.tanh(x / self.softcap)
        return x if self.temperature == 1.0 else x / self.temperature

    def slope(self, logits: torch.Tensor) -> torch.Tensor | float:
        """d apply(x) / dx, elementwise (a number when it does not depend on x)."""
        factor = self.scale / self.temperature
        if self.softcap is None:
            return factor
        return factor * (1.0 - torch.tanh(logits * (self.scale / self.softcap)).square())


def per_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    beta: float,
) -> torch.Tensor:
    """Per-row divergence between softmax(teacher) and softmax(student), both already transformed.

    ``kind`` is ``"fkl"`` (KL(teacher‖student)), ``"rkl"`` (KL(student‖teacher)) or ``"jsd"``,
    TRL's generalized JSD(β) with its special cases: β=0 is forward KL, β=1 reverse KL.
    """
    ls = F.log_softmax(student_logits, dim=-1)
    lt = F.log_softmax(teacher_logits, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "fkl"
    if kind == "jsd" and beta == 1.0:
        kind = "rkl"
    if kind == "fkl":
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "rkl":
        return (ls.exp() * (ls - lt)).sum(-1)
    mixture = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), dim=0)
    kl_teacher = (lt.exp() * (lt - mixture)).sum(-1)
    kl_student = (ls.exp() * (ls - mixture)).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


@torch.no_grad()
def monitoring_statistics(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
) -> dict[str, torch.Tensor | None]:
    """Teacher entropy and, given ``target`` (valid ids), log-probs of it and its teacher rank.

    The rank counts vocabulary entries whose teacher logit is strictly larger than the target's.
    """
    stats: dict[str, torch.Tensor | None] = {
        "teacher_entropy": -(teacher_logprobs.exp() * teacher_logprobs).sum(-1),
        "student_logprob": None,
        "teacher_logprob": None,
        "teacher_rank": None,
    }
    if target is not None:
        index = target.unsqueeze(-1)
        stats["student_logprob"] = student_logprobs.gather(-1, index)[..., 0]
        stats["teacher_logprob"] = teacher_logprobs.gather(-1, index)[..., 0]
        target_logit = teacher_logits.gather(-1, index)
        stats["teacher_rank"] = (teacher_logits > target_logit).sum(-1).to(torch.int32)
    return stats


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The full ``[N, V]`` LM-head output, as the naive way computes it."""
    return F.linear(hidden, weight, bias)
