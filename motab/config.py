"""Every option of the pipeline, as plain dataclasses, and their parsing from YAML and overrides.

Imports neither torch nor transformers, so that a configuration is checked in milliseconds, before
any model loads. The sections of a YAML run file map onto these classes: ``train`` →
``TrainConfig``, ``rollout`` → ``RolloutConfig``, ``monitor`` → ``MonitorConfig`` (the boundary; its
scores and rules are explained in ``motab.monitor``), ``student_sampling`` and ``teacher_sampling``
→ ``SamplingConfig``, ``synthesis`` → ``SynthesisOptions``, ``evaluation`` → ``EvaluationConfig``,
``sft`` → ``SFTOptions``; top-level keys name the models, the data (``field_map``: which record
fields to read, a ``FieldMap``) and the device. ``COMMANDS`` says which keys each command reads;
``resolve_config`` layers a command's preset, run file, flags and ``--set`` overrides, in that order.

Every value is read as its field's annotation says (``coerce_option``: ``1e-5``, which YAML 1.1
reads as a string, is a number for a float field; ``2.5`` is refused for an int) and checked against
its range; a mistake is a ``ConfigError`` naming ``section.option`` and what it must be.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import types
import warnings
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

SCORES = ("fkl", "rkl", "jsd", "teacher_nll", "teacher_rank")
RULES = ("window", "ema", "fixed", "quantile")
LOSS_KINDS = ("fkl", "rkl", "jsd")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration the command cannot run; the message says what to change. The CLI shows it as
    one line (exit 2) where any other exception keeps its traceback."""


class SettingWarning(UserWarning):
    """Settings that run but do not do what they seem to ask for (``silent_mistakes``); the CLI
    prints each as one line."""


def silent_mistakes(train: TrainConfig | None = None, sampling: dict | None = None) -> list[str]:
    """What a run's settings quietly do otherwise than asked: a warm-up longer than the training
    (the learning rate never reaches its peak), several samples of a greedy model (all alike).
    ``sampling``: {"samples": n, "temperature": t, "what": name} of eval or synthesize."""
    found = []
    if train is not None and train.warmup_steps > train.steps:
        found.append(
            f"train.warmup_steps ({train.warmup_steps}) is more than train.steps ({train.steps}): the learning rate "
            f"never reaches train.learning_rate ({train.learning_rate:g}); lower the warm-up"
        )
    if sampling is not None and sampling["samples"] > 1 and sampling["temperature"] == 0:
        found.append(
            f"{sampling['what']} {sampling['samples']} at temperature 0: greedy samples are all alike; set a "
            "temperature (the paper samples at 0.6)"
        )
    return found


def warn_silent_mistakes(**settings) -> None:
    """``silent_mistakes`` as ``SettingWarning``s."""
    for message in silent_mistakes(**settings):
        warnings.warn(message, SettingWarning, stacklevel=2)


class OptionError(ConfigError):
    """One option refused. ``template`` is the message with ``{option}`` where the option's name
    goes, so that the caller, which knows the section, can name it in full (``rollout.draft_len``)."""

    def __init__(self, name: str, template: str) -> None:
        self.name, self.template = name, template
        super().__init__(template.replace("{option}", name))

    def in_section(self, section: str) -> ConfigError:
        return ConfigError(self.template.replace("{option}", f"{section}.{self.name}"))


def _require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise OptionError(name, f"{{option}} {rule}, got {value!r}")


def _require_choice(name: str, value: Any, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise OptionError(name, f"{{option}}: unknown {what} {value!r}; expected one of {', '.join(choices)}")


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
        _require_choice("score", self.score, SCORES, "monitor score")
        _require_choice("rule", self.rule, RULES, "boundary rule")
        for name in ("window", "skd_top_k", "entropy_top_k"):
            _require(getattr(self, name) >= 1, name, "must be ≥ 1", getattr(self, name))
        _require(self.warmup >= 0, "warmup", "must be ≥ 0", self.warmup)
        _require(0.0 < self.ema_decay <= 1.0, "ema_decay", "must lie in (0, 1]", self.ema_decay)
        _require(0.0 <= self.quantile <= 1.0, "quantile", "must lie in [0, 1]", self.quantile)
        _require(0.0 <= self.beta <= 1.0, "beta", "must lie in [0, 1]", self.beta)
        _require(self.temperature > 0, "temperature", "must be > 0", self.temperature)
        _require(0.0 < self.epsilon0 <= 1.0, "epsilon0", "must lie in (0, 1]", self.epsilon0)
        _require(self.theta >= 0, "theta", "must be ≥ 0", self.theta)

    @property
    def divergence_kind(self) -> str:
        """The fused op's kind that yields the score (fkl when the score is not a divergence)."""
        return self.score if self.score in ("fkl", "rkl", "jsd") else "fkl"


MODES = ("motab", "on_policy", "off_policy", "skd", "adaswitch", "step_motab", "step_skd", "teacher_steps")
# How ``motab train`` spreads the student over several ranks (see ``motab.trainer``).
PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class SamplingConfig:
    """Temperature 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _require(self.temperature >= 0, "temperature", "must be ≥ 0 (0 is greedy)", self.temperature)
        _require(self.top_k >= 0, "top_k", "must be ≥ 0 (0 keeps every token)", self.top_k)
        _require(0 < self.top_p <= 1, "top_p", "must lie in (0, 1]", self.top_p)


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
    # The paged engine's KV pool per model, in tokens over all rows (0: as ``kv_memory`` allows on
    # a GPU; elsewhere the whole budget of the rows in flight, or of ``CPU_POOL_ROWS`` rows when
    # they are not capped). Rows take pages as they grow; a pool that runs dry
    # preempts the last row admitted, which re-enters later from its committed tokens.
    kv_tokens: int = 0
    # On a GPU without ``kv_tokens``: the share of the memory free after the weights the two pools
    # take (the rest is for activations: the verify forward, the fused op's chunks).
    kv_memory: float = 0.8
    # Replay one-token decode steps from CUDA graphs (motab.graphs); off until a GPU run has shown
    # them token for token equal to eager decoding on the user's models.
    cuda_graphs: bool = False
    # Step modes (see motab.steps). A step ends at the first occurrence of ``step_stop``, at EOS or
    # after ``max_step_tokens``; ``trim_stop`` cuts the stop string off as SGLang does for the scripts.
    step_stop: str = ".\n\n"
    trim_stop: bool = False
    max_step_tokens: int = 8192
    # step_motab's correction: the teacher writes up to EOS or max(this, budget − tokens before t*).
    min_correction_tokens: int = 256
    step_skd_gamma: float = 0.9  # keep a student step when V_teacher > γ · the student's own

    def __post_init__(self) -> None:
        _require_choice("mode", self.mode, MODES, "rollout mode")
        _require_choice("backtrack", self.backtrack, ("token", "step"), "backtrack unit")
        _require_choice("intervention", self.intervention, ("tokens", "step"), "intervention kind")
        for name in ("max_new_tokens", "draft_len", "intervention_len", "max_step_tokens", "block_size"):
            _require(getattr(self, name) >= 1, name, "must be ≥ 1", getattr(self, name))
        _require(self.kv_tokens >= 0, "kv_tokens", "must be ≥ 0 (0: sized by kv_memory on a GPU)", self.kv_tokens)
        _require(0 < self.kv_memory < 1, "kv_memory", "must lie in (0, 1)", self.kv_memory)
        _require(self.vocab_size is None or self.vocab_size >= 1, "vocab_size", "must be ≥ 1", self.vocab_size)
        _require(self.max_interventions >= 0, "max_interventions", "must be ≥ 0", self.max_interventions)
        _require(bool(self.step_stop), "step_stop", "must be a non-empty string", self.step_stop)
        # an empty stop string is found at once: every trajectory would end after one token
        _require(all(self.stop_strings), "stop_strings", "must be non-empty strings", list(self.stop_strings))
        _require(self.min_correction_tokens >= 0, "min_correction_tokens", "must be ≥ 0", self.min_correction_tokens)
        _require(self.step_skd_gamma >= 0, "step_skd_gamma", "must be ≥ 0", self.step_skd_gamma)


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
    save_total_limit: int | None = None  # keep the newest N checkpoints (None: all)
    seed: int = 0
    # Under torchrun: "ddp" replicates the student on every rank, "fsdp" shards it (FSDP2).
    parallel: str = "ddp"
    # Experiment trackers that get each metrics line, as transformers' ``TrainingArguments.report_to``
    # names them: "none", "all" (every one installed), a name or a list of names. Whether a name is
    # one of transformers' integrations and its package is installed is the trainer's to check (this
    # module imports no transformers), when it is built: before any rollout.
    report_to: str | tuple[str, ...] = "none"

    def __post_init__(self) -> None:
        _require_choice("parallel", self.parallel, PARALLEL, "parallel mode")
        if isinstance(self.report_to, list):  # one shape whether it came from YAML or from Python
            self.report_to = tuple(self.report_to)
        names = (self.report_to,) if isinstance(self.report_to, str) else self.report_to
        named = isinstance(names, tuple) and all(isinstance(name, str) and name for name in names)
        _require(named, "report_to", "must be a tracker's name or a list of names", self.report_to)
        alone = len(names) == 1 or not {"none", "all"} & set(names)
        _require(alone, "report_to", "takes none and all alone, not in a list", self.report_to)
        # FSDP's hooks run in every forward of a sharded student: a graph would capture them
        sharded_graphs = self.parallel == "fsdp" and self.rollout.cuda_graphs
        _require(not sharded_graphs, "parallel", "cannot be fsdp with rollout.cuda_graphs", self.parallel)
        for name in ("steps", "prompts_per_step", "micro_batch", "save_every"):
            _require(getattr(self, name) >= 1, name, "must be ≥ 1", getattr(self, name))
        limit = self.save_total_limit
        _require(limit is None or limit >= 1, "save_total_limit", "must be ≥ 1 (or null: keep all)", limit)
        rule = f"must be a multiple of micro_batch ({self.micro_batch})"
        _require(self.prompts_per_step % self.micro_batch == 0, "prompts_per_step", rule, self.prompts_per_step)
        for name in ("learning_rate", "warmup_steps", "weight_decay", "student_token_weight", "teacher_token_weight"):
            _require(getattr(self, name) >= 0, name, "must be ≥ 0", getattr(self, name))
        weights = self.student_token_weight + self.teacher_token_weight
        both = (self.student_token_weight, self.teacher_token_weight)
        _require(weights > 0, "student_token_weight", "and teacher_token_weight must not both be 0", both)
        _require_choice("loss_kind", self.loss_kind, LOSS_KINDS, "loss")
        _require(0.0 <= self.loss_beta <= 1.0, "loss_beta", "must lie in [0, 1]", self.loss_beta)
        _require(self.loss_temperature > 0, "loss_temperature", "must be > 0", self.loss_temperature)

    @property
    def trackers(self) -> tuple[str, ...]:
        """``report_to`` as a tuple of names, empty for "none" ("all" stays as it is)."""
        names = (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to)
        return () if names == ("none",) else names


# How ``motab synthesize`` writes a question as a prompt.
PROMPT_FORMATS = ("raw", "chat")


@dataclass(frozen=True)
class SynthesisOptions:
    """How questions become records (the rollout itself is a ``RolloutConfig``)."""

    responses: int = 5  # samples per question, as the scripts
    prompt_format: str = "raw"  # "raw": the bare question, as the scripts; "chat": the tokenizer's template
    marker: str = "However,"  # the transition between the student's steps and the teacher's correction
    seed: int = 0
    batch_size: int | None = None  # rows (question × response) in flight at most (None: as many as fit)

    def __post_init__(self) -> None:
        _require_choice("prompt_format", self.prompt_format, PROMPT_FORMATS, "prompt format")
        _require(self.responses >= 1, "responses", "must be ≥ 1", self.responses)
        _require(self.batch_size is None or self.batch_size >= 1, "batch_size", "must be ≥ 1 (null: as many as fit)",
                 self.batch_size)  # fmt: skip
        _require(self.seed >= 0, "seed", "must be ≥ 0", self.seed)


BACKENDS = ("paged", "vllm")


@dataclass(frozen=True)
class BackendOptions:
    """The engine a step rollout runs on (the ``backend`` section): our paged engine, or two vLLM
    engines (``motab.backends.vllm``), each with its tensor-parallel size and share of memory."""

    name: str = "paged"
    teacher_tp: int = 1  # vLLM: GPUs the teacher is split over
    student_tp: int = 1
    # vLLM: each engine's share of a GPU's memory (weights + KV cache); the student sits on the teacher's first GPU
    teacher_memory: float = 0.5
    student_memory: float = 0.3
    block_size: int = 32  # vLLM's KV page in tokens (its CPU attention needs a multiple of 32)
    enforce_eager: bool = False  # vLLM: no torch.compile, no CUDA graphs (faster start, slower decode)
    cpu_kv_gib: float = 4.0  # vLLM on a CPU: KV cache memory, shared by the memory shares

    def __post_init__(self) -> None:
        _require_choice("name", self.name, BACKENDS, "backend")
        for name in ("teacher_tp", "student_tp"):
            _require(getattr(self, name) >= 1, name, "must be ≥ 1", getattr(self, name))
        for name in ("teacher_memory", "student_memory"):
            _require(0 < getattr(self, name) <= 1, name, "must lie in (0, 1]", getattr(self, name))
        total = self.teacher_memory + self.student_memory
        _require(total <= 1, "student_memory", f"with teacher_memory must fit one GPU (sum {total:g} > 1)", total)
        _require(self.block_size >= 1 and self.block_size % 16 == 0, "block_size", "must be a multiple of 16",
                 self.block_size)  # fmt: skip
        _require(self.cpu_kv_gib > 0, "cpu_kv_gib", "must be > 0", self.cpu_kv_gib)


ANSWER_FORMAT_DEFAULT = "math"


@dataclass(frozen=True)
class EvaluationConfig:
    """How ``motab eval`` samples and grades (the ``evaluation`` section)."""

    samples: int | None = 1  # completions per problem (None: the paper's count, 4 and 1 on MATH-500)
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    batch_size: int | None = None  # rows in flight at most (None: as many as fit)
    kv_tokens: int = 0  # the paged engine's KV pool (as rollout.kv_tokens)
    seed: int = 0
    answer_format: str = ANSWER_FORMAT_DEFAULT  # a format registered with motab.evaluate (a custom file's)
    prompt_format: str = "chat"  # "chat": the template, the question and the format's instruction; "raw"
    pass_k: tuple[int, ...] | None = None  # the k of pass@k (None: 1, the powers of two below n, and n)

    def __post_init__(self) -> None:
        _require(self.samples is None or self.samples >= 1, "samples", "must be ≥ 1 (null: the paper's count)",
                 self.samples)  # fmt: skip
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be ≥ 1", self.max_new_tokens)
        _require(self.batch_size is None or self.batch_size >= 1, "batch_size", "must be ≥ 1 (null: as many as fit)",
                 self.batch_size)  # fmt: skip
        _require(self.kv_tokens >= 0, "kv_tokens", "must be ≥ 0 (0: sized as rollout.kv_tokens 0)", self.kv_tokens)
        _require(self.temperature >= 0, "temperature", "must be ≥ 0 (0 is greedy)", self.temperature)
        _require(0 < self.top_p <= 1, "top_p", "must lie in (0, 1]", self.top_p)
        _require(self.seed >= 0, "seed", "must be ≥ 0", self.seed)
        _require(bool(self.answer_format), "answer_format", "must name a format", self.answer_format)
        _require_choice("prompt_format", self.prompt_format, PROMPT_FORMATS, "prompt format")
        if self.pass_k is not None:
            _require(len(self.pass_k) > 0 and all(k >= 1 for k in self.pass_k), "pass_k",
                     "must list k ≥ 1 (null: 1, the powers of two below n, and n)", self.pass_k)  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_sft(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"SFTOptions.{name} {rule}, got {value!r}")


@dataclass
class SFTOptions:
    """Hyper-parameters of the SFT stage; the defaults are the reference scripts' (the checkpoint and
    logging cadence, gradient checkpointing and ``report_to`` are ours). ``max_steps`` overrides the
    epoch count, for tests and quick runs."""

    learning_rate: float = 5e-5
    num_train_epochs: float = 6
    #: cosine decay from ``learning_rate`` down to ``min_lr`` (transformers' ``cosine_with_min_lr``)
    min_lr: float = 1e-6
    #: fraction of the training steps spent in linear warm-up
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    packing: bool = True
    #: tokens per packed row, or the truncation length without packing (None: no truncation, packing off only)
    max_length: int | None = 32768
    #: with packing, the rows of a batch are flattened into one row of up to this many times max_length tokens
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    #: bf16 mixed precision; None means on exactly when CUDA is available
    bf16: bool | None = None
    #: recompute activations in the backward pass (TRL's default): long traces do not fit otherwise
    gradient_checkpointing: bool = True
    save_steps: int = 500
    #: checkpoints kept in output_dir (the oldest are deleted); None keeps them all
    save_total_limit: int | None = 2
    seed: int = 0
    logging_steps: int = 10
    max_steps: int | None = None
    #: where the Trainer reports metrics ("none", "tensorboard", "wandb", ...)
    report_to: str = "none"
    #: the Trainer's and the data preparation's progress bars
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("learning_rate", "num_train_epochs", "min_lr", "warmup_ratio", "weight_decay", "adam_beta2"):
            _check_sft(_is_number(getattr(self, name)), name, "must be a number", getattr(self, name))
        _check_sft(self.learning_rate > 0, "learning_rate", "must be > 0", self.learning_rate)
        _check_sft(self.num_train_epochs > 0, "num_train_epochs", "must be > 0", self.num_train_epochs)
        _check_sft(0 <= self.min_lr <= self.learning_rate, "min_lr", "must lie in [0, learning_rate]", self.min_lr)
        _check_sft(0 <= self.warmup_ratio < 1, "warmup_ratio", "must lie in [0, 1)", self.warmup_ratio)
        _check_sft(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check_sft(0 < self.adam_beta2 < 1, "adam_beta2", "must lie in (0, 1)", self.adam_beta2)
        length = self.max_length
        if length is None:
            _check_sft(not self.packing, "max_length", "must be set when packing (it is the packed row length)", None)
        else:
            _check_sft(_is_int(length) and length >= 1, "max_length", "must be an int >= 1", length)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
            value = getattr(self, name)
            _check_sft(_is_int(value) and value >= 1, name, "must be an int >= 1", value)
        for name in ("save_total_limit", "max_steps"):
            value = getattr(self, name)
            _check_sft(value is None or (_is_int(value) and value >= 1), name, "must be None or an int >= 1", value)
        _check_sft(_is_int(self.seed) and self.seed >= 0, "seed", "must be an int >= 0", self.seed)
        for name in ("packing", "gradient_checkpointing", "progress"):
            _check_sft(isinstance(getattr(self, name), bool), name, "must be a bool", getattr(self, name))
        _check_sft(self.bf16 is None or isinstance(self.bf16, bool), "bf16", "must be None, True or False", self.bf16)

    def use_bf16(self) -> bool:
        """Whether this run trains in bf16: explicit, or on CUDA only (CPU bf16 autocast is slow)."""
        import torch  # here only: the configuration loads without torch

        return torch.cuda.is_available() if self.bf16 is None else self.bf16


@dataclass(frozen=True)
class FieldMap:
    """The record fields of the prompt, the reference answer and the solution (None: not read)."""

    prompt: str
    answer: str | None = None
    solution: str | None = None


PRESETS = {
    "limo": FieldMap(prompt="question", solution="solution", answer="answer"),
    "acereason": FieldMap(prompt="problem", answer="answer", solution="solution"),
    # the MOTAB reference scripts' question files: the question in ``input``, no answer needed
    "input": FieldMap(prompt="input"),
}


FIELD_MAP_HELP = (
    "a preset (auto, " + ", ".join(PRESETS) + ") or the fields themselves: --field-map prompt=FIELD,answer=FIELD "
    "on the command line, field_map: {prompt: FIELD, answer: FIELD} in a YAML config (solution=FIELD optional)"
)


def parse_field_map(spec: str | dict | FieldMap) -> str | FieldMap:
    """A field map as a user writes it: a preset name or "auto" (returned as is), a mapping with the
    keys ``prompt`` (required), ``answer`` and ``solution``, or the same as ``prompt=q,answer=a``."""
    if isinstance(spec, FieldMap):
        return spec
    if isinstance(spec, str) and "=" not in spec:
        if spec != "auto" and spec not in PRESETS:
            raise ValueError(f"unknown field map {spec!r}; expected {FIELD_MAP_HELP}")
        return spec
    if isinstance(spec, str):
        pairs = [item.partition("=") for item in spec.split(",") if item.strip()]
        spec = {key.strip(): value.strip() for key, _, value in pairs}
    if not isinstance(spec, dict):
        raise ValueError(f"a field map is {FIELD_MAP_HELP}; got {spec!r}")
    keys = {"prompt", "answer", "solution"}
    if set(spec) - keys or not spec.get("prompt"):
        raise ValueError(f"a field map names prompt (required), answer and solution, got {spec!r}")
    if not all(isinstance(value, str) and value for value in spec.values()):
        raise ValueError(f"a field map's fields are non-empty names, got {spec!r}")
    return FieldMap(**spec)


# The sections and top-level keys of a run's configuration (YAML file, flags, --set overrides).
TOP_LEVEL = {"student", "teacher", "model", "data", "field_map", "max_prompt_tokens", "device", "dtype"}
# What each section builds. ``monitor`` and the samplings are fields of RolloutConfig and ``rollout``
# one of TrainConfig, but a config writes each as a section of its own.
SECTION_CLASSES = {
    "train": TrainConfig,
    "rollout": RolloutConfig,
    "monitor": MonitorConfig,
    "student_sampling": SamplingConfig,
    "teacher_sampling": SamplingConfig,
    "synthesis": SynthesisOptions,
    "evaluation": EvaluationConfig,
    "sft": SFTOptions,
    "backend": BackendOptions,
}
SECTIONS = set(SECTION_CLASSES)
_ROLLOUT_SECTIONS = ("rollout", "monitor", "student_sampling", "teacher_sampling")


@dataclass(frozen=True)
class CommandKeys:
    """What one command's configuration holds: its top-level keys (``required`` among them) and
    its sections; anything else in a run file is refused, naming the command."""

    top_level: tuple[str, ...]
    sections: tuple[str, ...]
    required: tuple[str, ...]


COMMANDS = {
    "train": CommandKeys(
        ("student", "teacher", "data", "field_map", "max_prompt_tokens", "device", "dtype"),
        ("train", *_ROLLOUT_SECTIONS),
        ("student", "teacher", "data"),
    ),
    # a rollout reads a training run's file as it is: its train section is not used
    "rollout": CommandKeys(
        ("student", "teacher", "data", "field_map", "max_prompt_tokens", "device", "dtype"),
        ("train", *_ROLLOUT_SECTIONS),
        ("student", "teacher", "data"),
    ),
    # the student is required unless the mode is teacher-written (motab.policy says; checked by the command)
    "synthesize": CommandKeys(
        ("student", "teacher", "data", "field_map", "device", "dtype"),
        ("synthesis", "backend", *_ROLLOUT_SECTIONS),
        ("teacher", "data"),
    ),
    # eval's one model takes the teacher's slot of the backend section (teacher_tp, teacher_memory)
    "eval": CommandKeys(
        ("model", "data", "field_map", "device", "dtype"), ("evaluation", "backend"), ("model", "data")
    ),
    "sft": CommandKeys(("model", "data", "device"), ("sft",), ("model", "data")),
}
# The devices the pipeline runs on (its kernels are Triton's, or the CPU's reference code).
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def resolve_config(
    path: str | Path | None,
    flags: dict[str, Any],
    overrides: list[str],
    *,
    command: str = "train",
    defaults: dict | None = None,
) -> dict:
    """The raw configuration of one ``command``'s run, each layer over the one before: ``defaults``
    (a preset, in the same sections as a file), the YAML file at ``path``, ``flags`` (values of
    command-line flags by option name, ``"student"`` or ``"train.steps"``; unset ones are None),
    then ``overrides`` (``SECTION.KEY=VALUE`` strings, values read as YAML). Keys the command does
    not read are refused, the required ones checked, every top-level value checked (the sections
    are checked when they are built: ``build_configs``, ``build_section``)."""
    keys = COMMANDS[command]
    allowed = set(keys.top_level) | set(keys.sections)
    raw = copy.deepcopy(defaults) if defaults else {}
    given = read_config_file(Path(path)) if path else {}
    _refuse_unknown(given, allowed, "config keys")
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)  # a file's section over the preset's: option by option
        else:
            raw[key] = value
    for key, value in flags.items():
        if value is None:  # an unset flag; 0 and "" are values, to be checked like any other
            continue
        if key in TOP_LEVEL:
            raw[key] = value
        else:
            set_option(raw, key, value)
    apply_overrides(raw, overrides)
    _refuse_unknown(raw, allowed, "config keys")
    for key in keys.required:
        if key not in raw:
            raise ConfigError(f"no {key} given (config key or --{key})")
    check_top_level(raw, command)
    return raw


def default_option(option: str) -> Any:
    """The default of ``section.option`` (its dataclass field's), or None for a top-level key."""
    section, _, name = option.partition(".")
    if not name:
        return None
    for f in fields(SECTION_CLASSES[section]):
        if f.name == name:
            return f.default
    raise ConfigError(f"{section} has no option {name!r}")


def read_config_file(path: Path) -> dict:
    """The mapping a YAML run file holds (empty for an empty file)."""
    if not path.is_file():
        raise ConfigError(f"config {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"config {path} is not UTF-8 text") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {_yaml_problem(error)}") from error
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of options (KEY: VALUE lines), got {raw!r}")
    return raw


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error on one line: its problem and where (its own message spans several lines)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """Sets each ``SECTION.KEY=VALUE`` (``--set``) in ``raw``, the value read as YAML."""
    for item in overrides:
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {_yaml_problem(error)}") from error
        set_option(raw, key, parsed)


def set_option(raw: dict, key: str, value: Any) -> None:
    """``raw[section][name] = value`` for ``key`` "section.name" (as ``--set`` names options)."""
    section, _, name = key.partition(".")
    if not (name and section in SECTIONS):
        raise ConfigError(f"options are named SECTION.KEY with SECTION in {sorted(SECTIONS)}, got {key!r}")
    if raw.get(section) is None:
        raw[section] = {}
    if not isinstance(raw[section], dict):
        raise _not_a_mapping(section, raw[section])
    raw[section][name] = value


def check_top_level(raw: dict, command: str = "train") -> None:
    """Refuses a top-level value of the wrong kind: a model or data path that is not a string (eval's
    data may map benchmark names to paths), a bad field map, max_prompt_tokens, device or dtype
    (converting max_prompt_tokens to an int)."""
    data = raw.get("data")
    if command == "eval" and isinstance(data, dict):
        if not data or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()):
            raise ConfigError(f"data must be a path or a mapping of benchmark names to paths, got {data!r}")
    for key in ("student", "teacher", "model", "data"):
        if key == "data" and command == "eval" and isinstance(data, dict):
            continue
        if key in raw and not (isinstance(raw[key], str) and raw[key]):
            raise ConfigError(f"{key} must be a folder, file or hub id (a non-empty string), got {raw[key]!r}")
    if "field_map" in raw:
        try:
            parse_field_map(raw["field_map"])
        except ValueError as error:
            raise ConfigError(f"field_map: {error}") from error
    if raw.get("max_prompt_tokens") is not None:
        tokens = coerce_option(raw["max_prompt_tokens"], int, "max_prompt_tokens")
        _require(tokens >= 1, "max_prompt_tokens", "must be ≥ 1", tokens)
        raw["max_prompt_tokens"] = tokens
    if raw.get("device") is not None:
        check_device(raw["device"], "device")
    if raw.get("dtype") is not None:
        check_dtype(raw["dtype"], "dtype")


def check_device(value: Any, name: str = "device") -> str:
    """``value`` if it names a device the pipeline runs on (whether one is there is torch's to say)."""
    if not (isinstance(value, str) and DEVICE_PATTERN.fullmatch(value)):
        raise ConfigError(f"{name}: unknown device {value!r}; expected cpu, cuda or cuda:N")
    return value


def check_dtype(value: Any, name: str = "dtype") -> str:
    """``value`` if it names a dtype the models load in."""
    if value not in DTYPES:
        raise ConfigError(f"{name}: unknown dtype {value!r}; expected one of {', '.join(DTYPES)}")
    return value


def changed_fields(before: dict, now: dict) -> list[tuple[tuple[str, ...], Any, Any]]:
    """Every leaf where two nested settings dicts (``asdict`` of a config, or its JSON) differ:
    ``(keys from the top, value before, value now)`` in key order. Tuples and lists with the same
    items are equal (a config read back from disk may hold either)."""
    found = []
    for key in sorted(set(before) | set(now)):
        x, y = before.get(key), now.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found += [((key, *keys), a, b) for keys, a, b in changed_fields(x, y)]
        elif _as_list(x) != _as_list(y):
            found.append(((key,), x, y))
    return found


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def build_configs(raw: dict) -> tuple[TrainConfig, RolloutConfig]:
    """(TrainConfig, RolloutConfig) from a resolved raw config."""
    built = {section: build_section(section, raw.get(section)) for section in SECTION_CLASSES}
    rollout = replace(
        built["rollout"],
        monitor=built["monitor"],
        student_sampling=built["student_sampling"],
        teacher_sampling=built["teacher_sampling"],
    )
    try:
        train = replace(built["train"], rollout=rollout)
    except OptionError as error:  # a train option that does not go with a rollout option
        raise error.in_section("train") from None
    return train, rollout


def build_section(section: str, values: Any) -> Any:
    """The config class of ``section`` from its raw options; every refusal names ``section.option``."""
    cls = SECTION_CLASSES[section]
    options = section_options(cls, section, values)
    try:
        return cls(**options)
    except OptionError as error:
        raise error.in_section(section) from error
    except ValueError as error:
        raise ConfigError(f"{section}: {error}") from error


def section_options(cls: type, section: str, values: Any) -> dict[str, Any]:
    """The options of ``section`` converted to the types of ``cls``'s fields. Unknown names, values
    of the wrong type and a nested section written inside this one are refused."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise _not_a_mapping(section, values)
    hints = get_type_hints(cls)
    nested = {f.name for f in fields(cls) if is_dataclass(hints[f.name])}
    for key in values:
        if key in nested:
            raise ConfigError(f"{section}.{key} is a section of its own: write `{key}:` at the top level of the config")
    _refuse_unknown(values, [f.name for f in fields(cls) if f.name not in nested], f"{section} options")
    converted = {}
    for key, value in values.items():
        try:
            converted[key] = coerce_option(value, hints[key], key)
        except OptionError as error:
            raise error.in_section(section) from error
    return converted


def _not_a_mapping(section: str, value: Any) -> ConfigError:
    return ConfigError(f"{section} must be a mapping of options ({section}: {{KEY: VALUE, ...}}), got {value!r}")


def _refuse_unknown(keys: Any, allowed: Any, what: str) -> None:
    """Refuses keys outside ``allowed``, with the nearest allowed name for a likely typo."""
    allowed = sorted(allowed)
    unknown = sorted((key for key in keys if key not in allowed), key=str)
    if unknown:
        guesses = [g for key in unknown for g in difflib.get_close_matches(str(key), allowed, n=1)]
        guess = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        raise ConfigError(f"unknown {what} {unknown}{guess}; expected some of {allowed}")


def coerce_option(value: Any, hint: Any, name: str) -> Any:
    """``value`` as a field annotated ``hint`` takes it, or an OptionError naming ``name`` and what
    was expected. Ints are whole numbers (never bools; ``2.0`` is 2, ``2.5`` refused), floats any
    number, bools only true or false, tuples lists of those. Numbers written as strings count as
    numbers: YAML 1.1, which PyYAML reads, takes ``1e-5`` for a string."""
    if value is None and _allows_none(hint):
        return None
    for kind in _kinds(hint):  # ``str | tuple[str, ...]``: the first kind that takes the value
        if get_origin(kind) is tuple:
            if isinstance(value, (list, tuple)):
                items = [_convert(item, get_args(kind)[0]) for item in value]
                if all(item is not None for item in items):
                    return tuple(items)
        else:
            converted = _convert(value, kind)
            if converted is not None:
                return converted
    raise OptionError(name, f"{{option}} must be {_expected(hint)}, got {value!r}")


def _convert(value: Any, kind: type) -> Any:
    """``value`` as a ``kind`` (int, float, bool or str), or None where it is not one."""
    if kind not in _CONVERTERS:  # a new field type: it needs a rule here
        raise TypeError(f"no rule to read a config option of type {kind}")
    return _CONVERTERS[kind](value)


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return None if math.isnan(number) else number  # NaN would pass every range check


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = _as_float(value)
    return int(number) if number is not None and number.is_integer() else None


_CONVERTERS = {
    int: _as_int,
    float: _as_float,
    bool: lambda value: value if isinstance(value, bool) else None,
    str: lambda value: value if isinstance(value, str) else None,
}
# How an option of each type is described when refused: (one value, a list of them).
_KINDS = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
    str: ("a string", "strings"),
}


def _expected(hint: Any) -> str:
    """What a field annotated ``hint`` takes, in words."""
    kinds = [f"a list of {_KINDS[get_args(k)[0]][1]}" if get_origin(k) is tuple else _KINDS[k][0] for k in _kinds(hint)]
    text = " or ".join(kinds)
    return f"{text} or null" if _allows_none(hint) else text


def _allows_none(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)


def _kinds(hint: Any) -> list[Any]:
    """The kinds a field takes: ``[X, Y]`` for ``X | Y | None``; ``[hint]`` for any other hint."""
    if get_origin(hint) not in (Union, types.UnionType):
        return [hint]
    return [arg for arg in get_args(hint) if arg is not type(None)]


# What each option means, one line each: the README's reference table (``reference_table``) is made
# from these, the dataclasses' types and their defaults, and a test keeps the README equal to it.
# Every field needs an entry here, so that a new option cannot go undocumented. Top-level keys are
# no dataclass fields: (type, default or ... when required, meaning).
TOP_LEVEL_HELP: dict[str, tuple[str, Any, str]] = {
    "student": ("str", ..., "the student model: a local folder or a hub id already in the local cache"),
    "teacher": ("str", ..., "the teacher model, as `student`; it must share the student's tokenizer"),
    "model": ("str", ..., "eval and sft: the model to evaluate or fine-tune, as `student`"),
    "data": (
        "str (eval: or a mapping)",
        ...,
        "the prompts: a JSONL or Parquet file or a saved `datasets` folder (eval: several benchmarks as "
        "{math500: PATH, aime24: PATH, ...})",
    ),
    "field_map": (
        "str or mapping",
        "auto",
        "which record fields hold the prompt, answer and solution: a preset (auto, "
        + ", ".join(PRESETS)
        + ") or {prompt: FIELD, answer: FIELD, solution: FIELD}",
    ),
    "max_prompt_tokens": ("int or null", None, "skip prompts longer than this many tokens (null: keep all)"),
    "device": ("str or null", None, "cpu, cuda or cuda:N (null: cuda when there is a GPU, else cpu)"),
    "dtype": ("str or null", None, f"the models' dtype: {', '.join(DTYPES)} (null: bfloat16 on CUDA, else float32)"),
}
OPTION_HELP: dict[type, dict[str, str]] = {
    TrainConfig: {
        "output_dir": "folder of the checkpoints and metrics.jsonl",
        "steps": "optimizer steps of the run",
        "prompts_per_step": "prompts rolled out and trained on per optimizer step (over all ranks)",
        "micro_batch": "rollouts per forward and backward; gradients accumulate over a step's micro-batches",
        "reuse_teacher_hidden": "train on the teacher hidden states the rollout computed instead of a second "
        "teacher forward",
        "loss_kind": f"the training divergence: {', '.join(LOSS_KINDS)}",
        "loss_beta": "the JSD mixture weight β of loss_kind jsd (0: forward KL, 1: reverse KL)",
        "loss_temperature": "temperature of both distributions in the loss (not the sampling temperature)",
        "student_token_weight": "loss weight of tokens the student wrote",
        "teacher_token_weight": "loss weight of tokens the teacher wrote (interventions, off-policy rows)",
        "learning_rate": "AdamW's peak learning rate",
        "weight_decay": "AdamW's weight decay",
        "warmup_steps": "steps of linear warm-up before the cosine decay",
        "max_grad_norm": "gradient clipping norm",
        "bf16": "bfloat16 autocast (null: on for CUDA, off on CPU)",
        "gradient_checkpointing": "recompute the student's activations in backward to save memory",
        "save_every": "steps between checkpoints",
        "save_total_limit": "keep only the newest N checkpoints (null: keep all)",
        "seed": "the run's random seed",
        "parallel": f"how torchrun ranks hold the student: {', '.join(PARALLEL)} (replicated or sharded)",
        "report_to": "experiment trackers that get each metrics line from rank 0, through transformers' "
        "integrations: none, all (every one installed), or a name or list of names (tensorboard, trackio, wandb, "
        "mlflow, ...; its package must be installed); TensorBoard writes under output_dir/runs/",
    },
    RolloutConfig: {
        "mode": f"who writes and what is monitored: {', '.join(MODES)}",
        "max_new_tokens": "tokens a trajectory may write after its prompt",
        "draft_len": "tokens the student drafts per round before the teacher verifies them in one forward",
        "backtrack": "how far back a stray cuts: token (before the stray token) or step (back to the last step end)",
        "delimiter_token_ids": "token ids that end a step for backtrack step (empty: the tokenizer's tokens "
        "holding a blank line)",
        "intervention": "what the teacher writes after a stray: tokens (intervention_len of them) or step "
        "(until it ends a step)",
        "intervention_len": "tokens of an intervention, or the cap of a step intervention",
        "max_interventions": "interventions per row; after that the row runs unmonitored",
        "eos_token_ids": "ids that end a trajectory (empty: the tokenizer's EOS)",
        "stop_strings": "texts that end a trajectory (checked with the tokenizer)",
        "vocab_size": "score and sample over ids below this (null: the tokenizer's size; padded LM heads are cut)",
        "block_size": "tokens per block of the paged KV cache",
        "kv_tokens": "paged engine: tokens each model's KV pool holds over all rows (0: kv_memory of a GPU's free "
        "memory; on a CPU the whole budget of the rows in flight, or of 32 rows); rows take pages as they grow and "
        "the last admitted is preempted (recomputed later) when the pool runs dry",
        "kv_memory": "paged engine on a GPU, kv_tokens 0: the share of the memory free after the weights the "
        "pools take",
        "cuda_graphs": "replay the one-token decode steps of student and teacher from CUDA graphs captured per "
        "bucket of row counts (CUDA only; fewer launches per token)",
        "step_stop": "step modes: the text that ends a step",
        "trim_stop": "step modes: cut the stop string off each step, as SGLang does for the reference scripts",
        "max_step_tokens": "step modes: the most tokens of one step",
        "min_correction_tokens": "step_motab: the teacher's correction may write up to max(this, the budget "
        "left before the root cause)",
        "step_skd_gamma": "step_skd: keep a student step when the teacher's value of it is above γ × the student's own",
    },
    MonitorConfig: {
        "score": f"what is held to the boundary per token: {', '.join(SCORES)}",
        "rule": f"the adaptive boundary: {', '.join(RULES)}",
        "beta": "the JSD mixture weight of score jsd",
        "window": "window rule: committed scores in the mean (L)",
        "window_factor": "window rule: a token strays above K × the window's mean",
        "ema_decay": "ema rule: the moving average's decay α",
        "ema_std_factor": "ema rule: a token strays above mean + c × std",
        "quantile": "quantile rule: a token strays above this quantile q of the row's scores",
        "tau": "fixed rule: the boundary (nats for divergences)",
        "tau_min": "floor of the adaptive boundaries",
        "warmup": "tokens per row before any decision",
        "skd_top_k": "skd mode and score teacher_rank: a token outside the teacher's top k strays",
        "temperature": "temperature of both distributions when scoring (not the sampling temperature)",
        "frozen_per_draft": "hold every token of a draft to the boundary the row had when the draft began",
        "epsilon0": "step modes: the boundary's scale ε0 in ε0 · exp(−θ · H)",
        "theta": "step modes: the boundary's sharpness θ",
        "entropy_top_k": "step modes: teacher tokens of the entropy H",
        "adaptive_boundary": "step modes: false forces H = 0, the constant ε0 of the reference scripts",
    },
    BackendOptions: {
        "name": "synthesize, eval: the engine: paged (ours) or vllm (two vLLM engines; eval: one)",
        "teacher_tp": "vllm: GPUs the teacher (eval: the model) is split over (tensor parallelism)",
        "student_tp": "vllm: GPUs the student is split over",
        "teacher_memory": "vllm: the teacher's (eval: the model's) share of a GPU's memory, weights and KV cache",
        "student_memory": "vllm: the student's share of a GPU's memory (it sits on the teacher's first GPU)",
        "block_size": "vllm: tokens a KV page (a multiple of 32 on a CPU)",
        "enforce_eager": "vllm: no torch.compile and no CUDA graphs (starts faster, decodes slower)",
        "cpu_kv_gib": "vllm on a CPU: KV cache GiB, split by the memory shares",
    },
    SynthesisOptions: {
        "responses": "synthesize: samples (records) per question",
        "prompt_format": f"synthesize: how a question becomes a prompt: {', '.join(PROMPT_FORMATS)} (the "
        "tokenizer's chat template)",
        "marker": "synthesize: the text between the student's kept steps and the teacher's correction",
        "seed": "synthesize: the seed each row's is hashed from (with the question's id and the response index)",
        "batch_size": "synthesize: rows (question × response) in flight at most, a row entering as one finishes "
        "(null: as many as the KV pool holds)",
    },
    EvaluationConfig: {
        "samples": "eval: completions per problem (null: the paper's count, 4 and 1 on MATH-500; 1 for a file)",
        "temperature": "eval: sampling temperature (0: greedy)",
        "top_p": "eval: nucleus sampling's top-p (1: off)",
        "max_new_tokens": "eval: tokens a completion may write",
        "batch_size": "eval: rows in flight at most, a row entering as one finishes (null: as many as the KV pool "
        "holds)",
        "kv_tokens": "eval, paged engine: tokens of the KV pool (0: as rollout.kv_tokens 0)",
        "seed": "eval: the seed of the samples (each hashes it with the benchmark, the problem's id and its index)",
        "answer_format": "eval: how a custom file's answers are graded: math (math-verify), choice (an option "
        "letter) or a format a front end registered (toy); a named benchmark has its own",
        "prompt_format": "eval: chat (the chat template around the question and the format's instruction) or raw "
        "(the bare question)",
        "pass_k": "eval: the k of pass@k, each ≤ the samples (null: 1, the powers of two below n, and n)",
    },
    SFTOptions: {
        "learning_rate": "sft: peak learning rate",
        "num_train_epochs": "sft: epochs over the records",
        "min_lr": "sft: the cosine schedule's floor",
        "warmup_ratio": "sft: share of the steps in linear warm-up",
        "weight_decay": "sft: AdamW's weight decay",
        "adam_beta2": "sft: AdamW's β2",
        "packing": "sft: pack records into rows of max_length tokens (documents never attend to each other)",
        "max_length": "sft: tokens per packed row, or the truncation length without packing (null: none, "
        "packing off only)",
        "per_device_train_batch_size": "sft: rows per device and step",
        "gradient_accumulation_steps": "sft: micro-batches per optimizer step",
        "bf16": "sft: bf16 mixed precision (null: on exactly when CUDA is available)",
        "gradient_checkpointing": "sft: recompute activations in backward",
        "save_steps": "sft: steps between checkpoints",
        "save_total_limit": "sft: checkpoints kept (null: all)",
        "seed": "sft: the run's seed",
        "logging_steps": "sft: steps between log lines",
        "max_steps": "sft: stop after this many optimizer steps (null: the epochs decide)",
        "report_to": "sft: where the Trainer reports metrics (none, tensorboard, wandb, ...)",
        "progress": "sft: the Trainer's progress bars",
    },
    SamplingConfig: {
        "temperature": "sampling temperature (0: greedy)",
        "top_k": "sample among the k likeliest tokens (0: all)",
        "top_p": "nucleus sampling's p (1: all)",
    },
}
REFERENCE_BEGIN = "<!-- yaml-reference: begin (generated by motab.config.reference_table) -->"
REFERENCE_END = "<!-- yaml-reference: end -->"


def reference_table() -> str:
    """Markdown: every option of a YAML run file, with its section, type, default and meaning (the
    README's reference table)."""
    rows = [("(top level)", key, kind, default, meaning) for key, (kind, default, meaning) in TOP_LEVEL_HELP.items()]
    missing = TOP_LEVEL ^ set(TOP_LEVEL_HELP)
    for section, cls in SECTION_CLASSES.items():
        if section == "teacher_sampling":  # the same class as student_sampling: one set of rows for both
            continue
        name = "student_sampling, teacher_sampling" if cls is SamplingConfig else section
        hints, help_of = get_type_hints(cls), OPTION_HELP.get(cls, {})
        for f in fields(cls):
            if is_dataclass(hints[f.name]):  # a section of its own
                continue
            if f.name not in help_of:
                missing.add(f"{section}.{f.name}")
                continue
            rows.append((name, f.name, _type_name(hints[f.name]), f.default, help_of[f.name]))
    if missing:
        raise KeyError(f"options without a meaning in motab.config's help: {sorted(missing)}")
    lines = ["| section | option | type | default | meaning |", "|---|---|---|---|---|"]
    for section, option, kind, default, meaning in rows:
        lines.append(f"| {section} | `{option}` | {kind} | {_default_text(default)} | {meaning} |")
    return "\n".join(lines) + "\n"


def _type_name(hint: Any) -> str:
    kinds = [f"list of {get_args(k)[0].__name__}" if get_origin(k) is tuple else k.__name__ for k in _kinds(hint)]
    text = " or ".join(kinds)
    return f"{text} or null" if _allows_none(hint) else text


def _default_text(default: Any) -> str:
    """A default as YAML would write it (null, true, [], "text"); a required key (``...``) has none."""
    if default is ...:
        return "required"
    if default is None:
        return "`null`"
    return f"`{json.dumps(list(default) if isinstance(default, tuple) else default)}`"
