"""Every option of the pipeline, as plain dataclasses, and their parsing from YAML and overrides.

Imports neither torch nor transformers, so that a configuration is checked in milliseconds, before
any model loads. The sections of a YAML run file map onto these classes: ``train`` →
``TrainConfig``, ``rollout`` → ``RolloutConfig``, ``monitor`` → ``MonitorConfig`` (the boundary; its
scores and rules are explained in ``motab.monitor``), ``student_sampling`` and ``teacher_sampling``
→ ``SamplingConfig``; top-level keys name the models, the data and the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

SCORES = ("fkl", "rkl", "jsd", "teacher_nll", "teacher_rank")
RULES = ("window", "ema", "fixed", "quantile")


@dataclass(frozen=True)
class MonitorConfig:
    """How scores are formed and compared; see the module docstring for the meaning of each."""

    score: str = "fkl"
    rule: str = "window"
    beta: float = 0.5  # JSD mixture weight, for score="jsd"
    window: int = 32  # L
    window_factor: float = 3.0  # K
    ema_decay: float = 0.05  # α
    ema_std_factor: float = 3.0  # c
    quantile: float = 0.95  # q
    tau: float = 1.0  # the fixed boundary, in nats for divergences
    tau_min: float = 0.5  # floor of the adaptive boundaries
    warmup: int = 8
    skd_top_k: int = 25
    temperature: float = 1.0  # of both distributions when scoring (separate from sampling)
    # Hold every token of a draft to the boundary the row had when the draft began (decided by the
    # fused op's own threshold comparison); by default the boundary moves token by token.
    frozen_per_draft: bool = False
    # The step-level modes' boundary ε0 · exp(−θ · H), H the entropy of the teacher's top-k next-token
    # distribution before the step (the paper's Eq. 6–7; its values). ``adaptive_boundary: false``
    # forces H = 0, the constant ε0 the reference scripts computed in effect on SGLang.
    epsilon0: float = 0.2
    theta: float = 1.0
    entropy_top_k: int = 20
    adaptive_boundary: bool = True

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"unknown monitor score {self.score!r}; expected one of {SCORES}")
        if self.rule not in RULES:
            raise ValueError(f"unknown boundary rule {self.rule!r}; expected one of {RULES}")
        for name in ("window", "skd_top_k", "entropy_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be ≥ 0, got {self.warmup}")
        if not 0.0 < self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1], got {self.ema_decay}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1], got {self.quantile}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 < self.epsilon0 <= 1.0 or self.theta < 0:
            raise ValueError(f"epsilon0 must lie in (0, 1] and theta be ≥ 0, got {self.epsilon0} and {self.theta}")

    @property
    def divergence_kind(self) -> str:
        """The fused op's kind that yields the score (fkl when the score is not a divergence)."""
        return self.score if self.score in ("fkl", "rkl", "jsd") else "fkl"


MODES = ("motab", "on_policy", "off_policy", "skd", "adaswitch", "step_motab", "step_skd", "teacher_steps")
# Modes that write rows step by step (``step_stop``, ``max_step_tokens``, ``trim_stop``): the paper's
# pipeline and the reference scripts' two baselines.
STEP_MODES = ("step_motab", "step_skd", "teacher_steps")


@dataclass(frozen=True)
class SamplingConfig:
    """Temperature 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self}")


@dataclass(frozen=True)
class RolloutConfig:
    """Everything a rollout decides by; defaults are the MOTAB method's."""

    mode: str = "motab"
    max_new_tokens: int = 256
    draft_len: int = 8
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    backtrack: str = "token"  # or "step"
    delimiter_token_ids: tuple[int, ...] = ()  # step ends; from the tokenizer's "\n\n" tokens if empty
    intervention: str = "tokens"  # or "step": the teacher writes until it ends a step
    intervention_len: int = 16  # tokens, or the cap of a "step" intervention
    max_interventions: int = 4
    student_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    teacher_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    vocab_size: int | None = None  # score and sample over ids below this (the tokenizer's)
    block_size: int = 16
    # Step modes (see motab.steps). A step ends at the first occurrence of ``step_stop``, at EOS or
    # after ``max_step_tokens``; ``trim_stop`` cuts the stop string off as SGLang does for the scripts.
    step_stop: str = ".\n\n"
    trim_stop: bool = False
    max_step_tokens: int = 8192
    # step_motab's correction: the teacher writes up to EOS or max(this, budget − tokens before t*).
    min_correction_tokens: int = 256
    step_skd_gamma: float = 0.9  # keep a student step when V_teacher > γ · the student's own

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown rollout mode {self.mode!r}; expected one of {MODES}")
        if self.backtrack not in ("token", "step") or self.intervention not in ("tokens", "step"):
            raise ValueError("backtrack must be 'token' or 'step'; intervention 'tokens' or 'step'")
        for name in ("max_new_tokens", "draft_len", "intervention_len", "max_step_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_interventions < 0:
            raise ValueError(f"max_interventions must be ≥ 0, got {self.max_interventions}")
        if not self.step_stop:
            raise ValueError("step_stop must be a non-empty string")
        if self.min_correction_tokens < 0 or self.step_skd_gamma < 0:
            raise ValueError("min_correction_tokens and step_skd_gamma must be ≥ 0")


@dataclass
class TrainConfig:
    """Options of a training run (the CLI's YAML maps onto these fields)."""

    output_dir: str = "runs/motab"
    steps: int = 100
    prompts_per_step: int = 8
    micro_batch: int = 4
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # Train on the teacher hidden states the rollout computed anyway instead of running the teacher
    # again (one teacher forward less per step, for the memory of those states until the step ends).
    reuse_teacher_hidden: bool = True
    loss_kind: str = "fkl"
    loss_beta: float = 0.5
    loss_temperature: float = 1.0  # the loss's own temperature, not the sampling temperature
    student_token_weight: float = 1.0
    teacher_token_weight: float = 1.0
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # autocast; default: on for CUDA
    gradient_checkpointing: bool = False
    save_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "micro_batch", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.prompts_per_step % self.micro_batch:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) must be a multiple of micro_batch ({self.micro_batch})"
            )
        if self.learning_rate < 0 or self.warmup_steps < 0:
            raise ValueError("learning_rate and warmup_steps must be ≥ 0")


# The sections and top-level keys of a run's configuration (YAML file, flags, --set overrides).
TOP_LEVEL = {"student", "teacher", "data", "field_map", "max_prompt_tokens", "device", "dtype"}
SECTIONS = {"train", "rollout", "monitor", "student_sampling", "teacher_sampling"}


class ConfigError(ValueError):
    """A configuration the command cannot run; the message says what to change."""


def resolve_config(path: str | Path | None, flags: dict[str, Any], overrides: list[str]) -> dict:
    """The raw configuration of a run: the YAML file at ``path``, then ``flags`` (values of
    command-line flags by option name, ``"student"`` or ``"train.steps"``; unset ones are None),
    then ``overrides`` (``SECTION.KEY=VALUE`` strings, values read as YAML); every key checked."""
    raw = {}
    if path:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping of options")
    unknown = set(raw) - TOP_LEVEL - SECTIONS
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(unknown)}; expected {sorted(TOP_LEVEL | SECTIONS)}")
    for key, value in flags.items():
        if not value:
            continue
        if key in TOP_LEVEL:
            raw[key] = value
        else:
            set_option(raw, key, value)
    apply_overrides(raw, overrides)
    for key in ("student", "teacher", "data"):
        if key not in raw:
            raise ConfigError(f"no {key} given (config key or --{key})")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """Sets each ``SECTION.KEY=VALUE`` (``--set``) in ``raw``, the value read as YAML."""
    for item in overrides:
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        set_option(raw, key, yaml.safe_load(value))


def set_option(raw: dict, key: str, value) -> None:
    """``raw[section][name] = value`` for ``key`` "section.name" (as ``--set`` names options)."""
    section, _, name = key.partition(".")
    if not (name and section in SECTIONS):
        raise ConfigError(f"options are named SECTION.KEY with SECTION in {sorted(SECTIONS)}, got {key!r}")
    raw.setdefault(section, {})[name] = value


def build_configs(raw: dict) -> tuple[TrainConfig, RolloutConfig]:
    """(TrainConfig, RolloutConfig) from a resolved raw config."""

    def make(cls, section):
        values = dict(raw.get(section) or {})
        allowed = {f.name for f in fields(cls)}
        bad = set(values) - allowed
        if bad:
            raise ConfigError(f"unknown {section} options {sorted(bad)}; expected some of {sorted(allowed)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{section}: {error}") from error

    monitor = make(MonitorConfig, "monitor")
    rollout = make(RolloutConfig, "rollout")
    rollout = replace(
        rollout,
        monitor=monitor,
        student_sampling=make(SamplingConfig, "student_sampling"),
        teacher_sampling=make(SamplingConfig, "teacher_sampling"),
    )
    return replace(make(TrainConfig, "train"), rollout=rollout), rollout
