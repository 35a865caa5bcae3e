"""Each rollout mode as a policy: data the engine reads, so that a new method is one more entry
here and not one more branch there.

A policy says who writes a row first, what is monitored and at which granularity, what happens
on a stray, and how long the teacher then writes. The monitored ``unit`` is a token (the online
variant: each drafted token against ``motab.monitor``'s boundary) or a step (the paper: each
finished step's oracle value against its entropy boundary, ``motab.steps``).

``on_stray``:

- ``intervene``: rewind (to the last safe token, or the last step delimiter with
  ``backtrack="step"``), the teacher writes ``intervention_len`` tokens or one step, the student
  resumes; at most ``max_interventions`` per row, then the row runs unmonitored.
- ``replace``: the stray token is replaced by one teacher token (SKD); no budget.
- ``switch``: the teacher writes the rest of the row (AdaSwitch).
- ``root_cause``: rewind to the context before the TD-error root-cause step, the teacher writes
  the rest of the solution without a stop string (the paper's MOTAB; one breach per row).
- ``teacher_step``: the teacher rewrites that one step, the student resumes (the scripts'
  step-level SKD).

``step_test`` (step units): ``boundary`` breaches when V < ε; ``skd_ratio`` when V ≤ γ · the
student's own geometric-mean probability of the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from motab.config import MonitorConfig, RolloutConfig


@dataclass(frozen=True)
class Policy:
    writer: str = "student"  # who writes a row first: "student" or "teacher"
    unit: str | None = None  # what is monitored: None, "token" or "step"
    on_stray: str | None = None  # see the module docstring
    in_steps: bool = False  # rows are written step by step (stop string, step budget, trimming)
    step_test: str | None = None  # "boundary" or "skd_ratio" (step units)
    budgeted: bool = True  # interventions count against max_interventions

    @property
    def student_resumes(self) -> bool:
        """Whether the student writes again after the teacher corrected a stray."""
        return self.on_stray in ("intervene", "replace", "teacher_step")


POLICIES = {
    "motab": Policy(unit="token", on_stray="intervene"),
    "on_policy": Policy(),
    "off_policy": Policy(writer="teacher"),
    "skd": Policy(unit="token", on_stray="replace", budgeted=False),
    "adaswitch": Policy(unit="token", on_stray="switch"),
    "step_motab": Policy(unit="step", on_stray="root_cause", in_steps=True, step_test="boundary"),
    "step_skd": Policy(unit="step", on_stray="teacher_step", in_steps=True, step_test="skd_ratio"),
    "teacher_steps": Policy(writer="teacher", in_steps=True),
}


def policy_for(config: RolloutConfig) -> tuple[Policy, MonitorConfig]:
    """The mode's policy and the monitor settings it runs with."""
    policy = POLICIES[config.mode]
    monitor = config.monitor
    if config.mode == "skd":  # SKD's test: the token is outside the teacher's top k
        monitor = replace(monitor, score="teacher_rank", warmup=0)
    elif config.mode == "adaswitch":  # AdaSwitch compares with the window mean
        monitor = replace(monitor, rule="window")
    elif policy.in_steps:  # per token, the teacher's surprise at temperature 1 (what V is made of)
        monitor = replace(monitor, score="teacher_nll", temperature=1.0)
    return policy, monitor


def intervention_budget(policy: Policy, config: RolloutConfig) -> float:
    return config.max_interventions if policy.budgeted else math.inf
