"""Each rollout mode as one ``Policy`` value, and ``resolve``: the one place a run's settings are
settled. A new method is one more entry in ``POLICIES``, not one more branch in the engine, the
trainer or the commands; nothing outside this module tests a mode's name.

A policy says who writes a row first, what is monitored and at which granularity, what happens
on a stray, whether the student writes again after a correction, and which monitor settings the
mode imposes. The monitored ``unit`` is a token (the online variant: each drafted token against
``motab.monitor``'s boundary) or a step (the paper: each finished step's oracle value against its
entropy boundary, ``motab.steps``).

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

This module imports neither torch nor transformers: the commands settle and print a run's settings
before any model loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from motab.config import ConfigError, RolloutConfig, TrainConfig


@dataclass(frozen=True)
class Policy:
    writer: str = "student"  # who writes a row first: "student" or "teacher"
    unit: str | None = None  # what is monitored: None, "token" or "step"
    on_stray: str | None = None  # see the module docstring
    student_resumes: bool = False  # the student writes again after the teacher corrected a stray
    in_steps: bool = False  # rows are written step by step (stop string, step budget, trimming)
    step_test: str | None = None  # "boundary" or "skd_ratio" (step units)
    budgeted: bool = True  # interventions count against max_interventions
    # The monitor settings the mode imposes over the user's, as (field, value) pairs: the scores it
    # tests are of its own kind, whatever the run file says.
    monitor: tuple[tuple[str, Any], ...] = ()

    @property
    def monitors(self) -> bool:
        """Whether rows are held to a boundary (the trainer then draws interventions)."""
        return self.unit is not None

    @property
    def needs_student(self) -> bool:
        """Whether the mode runs the student (teacher-written modes run without one)."""
        return self.writer == "student"

    def intervention_budget(self, config: RolloutConfig) -> float:
        """Monitored interventions a row may take before it runs unmonitored."""
        return config.max_interventions if self.budgeted else math.inf


# Per token, the step modes score the teacher's surprise at temperature 1: what V is made of.
_STEP_SCORE = (("score", "teacher_nll"), ("temperature", 1.0))

POLICIES = {
    "motab": Policy(unit="token", on_stray="intervene", student_resumes=True),
    "on_policy": Policy(),
    "off_policy": Policy(writer="teacher"),
    # SKD's test: the token is outside the teacher's top k, from the first token on
    "skd": Policy(
        unit="token",
        on_stray="replace",
        student_resumes=True,
        budgeted=False,
        monitor=(("score", "teacher_rank"), ("warmup", 0)),
    ),
    # AdaSwitch compares each score with the window's mean
    "adaswitch": Policy(unit="token", on_stray="switch", monitor=(("rule", "window"),)),
    "step_motab": Policy(unit="step", on_stray="root_cause", in_steps=True, step_test="boundary", monitor=_STEP_SCORE),
    "step_skd": Policy(
        unit="step",
        on_stray="teacher_step",
        student_resumes=True,
        in_steps=True,
        step_test="skd_ratio",
        monitor=_STEP_SCORE,
    ),
    "teacher_steps": Policy(writer="teacher", in_steps=True, monitor=_STEP_SCORE),
}

# The modes that write step by step: the paper's synthesis and the reference scripts' baselines.
STEP_MODES = tuple(name for name, policy in POLICIES.items() if policy.in_steps)


def policy_of(mode: str) -> Policy:
    """The mode's policy; an unknown name is refused with the known ones."""
    if mode not in POLICIES:
        raise ConfigError(f"unknown rollout mode {mode!r}; expected one of {', '.join(POLICIES)}")
    return POLICIES[mode]


def resolve(config: RolloutConfig, tokenizer=None) -> tuple[RolloutConfig, Policy]:
    """The settings a rollout runs with, and its mode's policy: the mode's monitor settings over the
    user's, then what the config leaves to the tokenizer (vocabulary size, EOS, step delimiters).
    Settled once, here: what the commands print is this config, and the engine runs this config.
    Resolving a resolved config changes nothing."""
    policy = policy_of(config.mode)
    if policy.monitor:
        config = replace(config, monitor=replace(config.monitor, **dict(policy.monitor)))
    if tokenizer is not None:
        config = with_tokenizer_defaults(config, tokenizer)
    return config, policy


def resolve_training(config: TrainConfig, tokenizer=None) -> TrainConfig:
    """``config`` with its rollout settled by ``resolve``."""
    return replace(config, rollout=resolve(config.rollout, tokenizer)[0])


def with_tokenizer_defaults(config: RolloutConfig, tokenizer) -> RolloutConfig:
    """Fills what ``config`` leaves to the tokenizer: the vocabulary size, EOS and the step
    delimiters (every token whose text holds a blank line)."""
    updates = {}
    if config.vocab_size is None:
        updates["vocab_size"] = len(tokenizer)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        updates["eos_token_ids"] = (tokenizer.eos_token_id,)
    if not config.delimiter_token_ids:
        # sorted: a fast tokenizer's vocabulary comes in no fixed order, and a resumed run compares settings
        updates["delimiter_token_ids"] = tuple(
            sorted(
                i for token, i in tokenizer.get_vocab().items() if "\n\n" in tokenizer.convert_tokens_to_string([token])
            )
        )
    return replace(config, **updates) if updates else config
