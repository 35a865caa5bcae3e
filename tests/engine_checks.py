"""A check of the rollout engine's alignment invariant, for the engine's tests."""

from __future__ import annotations

import torch

from motab.engine.step import StepRollout
from motab.engine.token import TokenRounds


def check_invariant_every_round(monkeypatch, student_pm, teacher_pm):
    """After every round, each live row's caches hold its committed tokens but the pending one
    (the student's only while the student writes it: a row the teacher writes for good, or is
    rewriting a step of, leaves the student's cache behind until it resumes)."""
    checked = []

    def check(self, rows):
        engine = getattr(self, "backend", self)  # the step algorithm's paged backend, or the token driver
        engine.apply_cuts()  # the round's cuts reach the caches as the round ends
        for row in rows:
            if row.finished:
                continue
            shared = engine.student is engine.teacher
            models = [teacher_pm] if row.teacher_writes or shared else [student_pm, teacher_pm]
            for pm in models:
                sequence = row.sequence
                assert pm.lengths([row.slot]) == [len(sequence) - 1]
                hidden = pm.extend([row.slot], [[sequence[-1]]])[0]
                fresh = pm.model.model(torch.tensor([sequence], device=pm.device)).last_hidden_state[0, -1]
                torch.testing.assert_close(hidden, fresh, rtol=1e-4, atol=1e-4)
                pm.truncate([row.slot], [len(sequence) - 1])
            checked.append(row.index)

    for driver in (TokenRounds, StepRollout):
        for name in ("draft_round", "teacher_round"):
            original = getattr(driver, name)

            def wrapped(self, rows, original=original):
                original(self, rows)
                check(self, rows)

            monkeypatch.setattr(driver, name, wrapped)
    return checked
