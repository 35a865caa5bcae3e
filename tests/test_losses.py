"""TrajectoryDistillationLoss: which positions count, with what weight, normalised how."""

import pytest
import torch

from motab.losses import NO_LOSS, STUDENT, TEACHER, TrajectoryDistillationLoss, trajectory_targets
from motab_kernels.reference import per_token_divergence


def test_targets_shift_and_sources():
    ids, targets, codes = trajectory_targets([1, 2, 3], [7, 8, 9], ["student", "teacher", "student"])
    assert ids == [1, 2, 3, 7, 8, 9]
    assert targets == [2, 3, 7, 8, 9, 0]
    assert codes == [NO_LOSS, NO_LOSS, STUDENT, TEACHER, STUDENT, NO_LOSS]
    with pytest.raises(ValueError, match="3 tokens but 2 sources"):
        trajectory_targets([1], [1, 2, 3], ["student", "teacher"])


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_weights_and_normalisation_are_explicit(kind):
    g = torch.Generator().manual_seed(0)
    n, d, v = 9, 16, 50
    hs, ws = torch.randn(n, d, generator=g, requires_grad=True), torch.randn(v, d, generator=g)
    ht, wt = torch.randn(n, 24, generator=g), torch.randn(v, 24, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    sources = torch.tensor([NO_LOSS, NO_LOSS, STUDENT, TEACHER, STUDENT, TEACHER, STUDENT, NO_LOSS, TEACHER])
    loss_fn = TrajectoryDistillationLoss(kind=kind, beta=0.3, temperature=0.8, student_weight=1.0, teacher_weight=0.5)
    out = loss_fn(hs, ws, ht, wt, targets, sources)
    per_token = per_token_divergence((hs @ ws.T) / 0.8, (ht @ wt.T) / 0.8, kind, 0.3)
    weights = torch.tensor([0, 0, 1, 0.5, 1, 0.5, 1, 0, 0.5])
    expected = (weights * per_token).sum() / 6  # six positions carry a loss
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    # only the student's tokens, normalised by a count given from outside (accumulation)
    student_only = TrajectoryDistillationLoss(kind=kind, beta=0.3, temperature=0.8, teacher_weight=0.0)
    out = student_only(hs, ws, ht, wt, targets, sources, normalizer=10)
    torch.testing.assert_close(out.loss, per_token[[2, 4, 6]].sum() / 10, rtol=1e-5, atol=1e-6)


def test_bad_weights():
    with pytest.raises(ValueError, match="source weights"):
        TrajectoryDistillationLoss(student_weight=0.0, teacher_weight=0.0)
