"""Naive PyTorch versions of the ops: ground truth for the tests and the benchmarks' baseline.

Everything here materialises full ``[N, V]`` tensors and lets autograd derive the gradients. The
divergences follow TRL's ``GKDTrainer.generalized_jsd_loss`` formula term by term (log-softmax,
log-space mixture), so they can be checked against it and against float64 runs of themselves.
Like FLA's ``naive.py`` files, this module imports nothing from the fast paths: a
misunderstanding there cannot leak into the truth they are checked against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import Categorical


def transformed_logits(
    raw: torch.Tensor, scale: float = 1.0, softcap: float | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """The logits a softmax sees: raw LM-head outputs times ``scale``, soft-capped as
    ``softcap·tanh(x / softcap)`` when given, divided by ``temperature``."""
    x = raw * scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


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
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """From transformed logits: the teacher's entropy and, given ``target`` (valid ids), the
    log-probabilities of it under both models and its teacher rank — the number of vocabulary
    entries whose teacher logit is strictly larger than the target's."""
    teacher = Categorical(logits=teacher_logits, validate_args=False)
    stats: dict[str, torch.Tensor | None] = {"teacher_entropy": teacher.entropy()}
    stats |= dict.fromkeys(("student_logprob", "teacher_logprob", "teacher_rank"))
    if target is not None:
        stats["student_logprob"] = Categorical(logits=student_logits, validate_args=False).log_prob(target)
        stats["teacher_logprob"] = teacher.log_prob(target)
        target_logit = teacher_logits.gather(-1, target[..., None])
        stats["teacher_rank"] = (teacher_logits > target_logit).sum(-1).to(torch.int32)
    return stats
