"""The ``motab`` command: the paper's pipeline (``synthesize``, ``sft``), online distillation
(``train``), ``rollout``, ``eval`` and the ``demo``.

    motab synthesize --student S --teacher T --data questions.jsonl --out records.jsonl   # the paper's data
    motab sft --model S --data records.jsonl --out sft/                                   # SFT on those records
    motab train --config run.yaml                 # online distillation (MOTAB or a baseline); resumable
    motab rollout --student S --teacher T --data problems.jsonl --out trajectories.jsonl --render rollout.png
    motab eval --model M --data test.jsonl --out eval/
    motab demo                                    # the toy task, on a CPU, in minutes

Models and tokenizers load from a local folder or a Hugging Face hub id that is already in the
local cache: nothing is downloaded (``hf download ID`` fetches one first). A YAML
config has top-level ``student``, ``teacher``, ``data`` (and optionally ``field_map``,
``max_prompt_tokens``, ``device``, ``dtype``) plus sections ``train`` (TrainConfig), ``rollout``
(RolloutConfig), ``monitor`` (MonitorConfig), ``student_sampling`` and ``teacher_sampling`` (all
in ``motab.config``); ``--set section.key=value`` overrides any of them. ``train`` and ``rollout``
print the resolved configuration once the tokenizer has filled in EOS, the vocabulary size and the
step delimiters.

A mistake in what a command is given (an option, a file, a model, a device) is reported as one line
naming it, with exit status 2, before any model loads; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from motab.config import (
    BACKENDS,
    FIELD_MAP_HELP,
    PROMPT_FORMATS,
    TOP_LEVEL,
    ConfigError,
    FieldMap,
    RolloutConfig,
    build_configs,
    build_section,
    check_device,
    check_dtype,
    default_option,
    parse_field_map,
    resolve_config,
    set_option,
    warn_silent_mistakes,
)
from motab.policy import POLICIES, STEP_MODES, policy_of, resolve, resolve_training
from motab.runs import CLI_FLAGS, append_line, count_lines, interrupting_signal, kept_line, sigterm_as_interrupt
from motab.toy.task import PAPER_PRESET as TOY_PRESET

# The reference scripts' stop string, marker, budgets and sampling, as synthesize's flags name them.
PAPER_PRESET = dict(
    stop=".\n\n",
    marker="However,",
    max_new_tokens=32768,
    max_step_tokens=8192,
    min_correction_tokens=256,
    temperature=0.6,
)


def main(argv: list[str] | None = None) -> int:
    """Runs one command; a user's mistake (ConfigError) is printed as one line and gives 2. Ctrl-C
    and SIGTERM end every command the same way: what it kept (``args.kept()``, set by the command
    once it has an output) is said in one line, and the exit status is 130 or 143."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(), sigterm_as_interrupt():
            warnings.showwarning = one_line_warnings(args.command, warnings.showwarning)
            return args.run(args)
    except ConfigError as error:
        print(f"motab {args.command}: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        kept = getattr(args, "kept", None)
        said = kept() if kept is not None else "nothing was written"
        print(f"motab {args.command}: interrupted: {said}", file=sys.stderr)
        return 128 + interrupting_signal(interrupt)


def one_line_warnings(command: str, show: Callable) -> Callable:
    """A ``warnings.showwarning`` that prints our own warnings (a changed setting on resume) as one
    line, ``motab <command>: warning: ...``, and hands the libraries' to ``show``."""

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] != "motab":
            return show(message, category, filename, lineno, file, line)
        print(f"motab {command}: warning: {one_line(str(message))}", file=file or sys.stderr)

    return show_warning


def one_line(message: str) -> str:
    """``message`` with its line breaks folded (some come from libraries' own errors)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser with its errors (exit 2, as argparse's) on one line; the usage they print
    first is one ``--help`` away."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ≥ ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be ≥ {minimum}, got {value}")
        return value

    return parse


def number_at_least(minimum: float, *, strictly: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number ≥ ``minimum`` (> with ``strictly``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strictly and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strictly else '≥'} {minimum:g}, got {text}")
        return value

    return parse


def field_map_flag(text: str) -> str | FieldMap:
    """The argparse type of --field-map: a preset or prompt=FIELD,answer=FIELD."""
    try:
        return parse_field_map(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def int_list(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers ≥ 1 (``--pass-k 1,4``)."""
    try:
        values = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers ≥ 1 separated by commas, got {text!r}")
    return values


def unescaped(text: str) -> str:
    """An argparse type: ``text`` with its backslash escapes (``\\n``) read, as a flag writes a stop string."""
    import codecs

    try:
        return codecs.decode(text, "unicode_escape")
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error.reason}") from None


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets options of the run's configuration: ``options`` are where its
    value goes (top-level keys such as ``"student"``, or ``"section.option"``). The one table of a
    command's flags builds its parser and maps the parsed values (``flag_options``); a flag's
    default is the configuration's, so its help reads it from the dataclass."""

    name: str
    options: tuple[str, ...]
    help: str
    kwargs: dict = field(default_factory=dict)  # argparse's type, choices, const

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


def _flag(name: str, options: str | tuple[str, ...], help: str, **kwargs) -> Flag:
    return Flag(name, (options,) if isinstance(options, str) else options, help, kwargs)


def _switch(name: str, option: str, value: bool, help: str) -> Flag:
    """A flag without a value that sets ``option`` to ``value``."""
    return Flag(name, (option,), help, dict(action="store_const", const=value))


MODEL_FLAGS = (
    _flag("--student", "student", "local folder or cached hub id"),
    _flag("--teacher", "teacher", "local folder or cached hub id"),
    _flag("--data", "data", "JSONL / Parquet / datasets folder"),
    _flag("--device", "device", "cpu, cuda or cuda:N (default: cuda when available)"),
)
TRAIN_FLAGS = (
    *MODEL_FLAGS,
    _flag("--output-dir", "train.output_dir", "where checkpoints and metrics.jsonl go"),
    _flag("--steps", "train.steps", "optimizer steps", type=int_at_least(1)),
    _flag("--mode", "rollout.mode", f"one of {', '.join(POLICIES)}"),
    _flag("--report-to", "train.report_to", "experiment tracker(s): none, all, tensorboard, trackio, wandb, ..."),
)
KV_TOKENS_HELP = (
    "paged engine: tokens of each model's KV pool; rows take pages as they grow (0: a share of a GPU's memory)"
)
ROLLOUT_FLAGS = (
    *MODEL_FLAGS,
    _flag("--mode", "rollout.mode", f"one of {', '.join(POLICIES)}"),
    _flag("--kv-tokens", "rollout.kv_tokens", KV_TOKENS_HELP, type=int_at_least(0)),
)
TEMPERATURES = ("student_sampling.temperature", "teacher_sampling.temperature")
# The engine a step rollout runs on (the backend section).
BACKEND_FLAGS = (
    _flag("--backend", "backend.name", "paged: our engine; vllm: two vLLM engines", choices=BACKENDS),
    _flag("--teacher-tp", "backend.teacher_tp", "vllm: GPUs the teacher is split over", type=int_at_least(1)),
    _flag("--student-tp", "backend.student_tp", "vllm: GPUs the student is split over", type=int_at_least(1)),
    _flag(
        "--teacher-memory",
        "backend.teacher_memory",
        "vllm: the teacher's share of a GPU's memory",
        type=number_at_least(0, strictly=True),
    ),
    _flag(
        "--student-memory",
        "backend.student_memory",
        "vllm: the student's share of a GPU's memory",
        type=number_at_least(0, strictly=True),
    ),
)
SYNTHESIZE_FLAGS = (
    *MODEL_FLAGS,
    _flag("--dtype", "dtype", "float32 or bfloat16 (default: bfloat16 on CUDA)"),
    _flag("--field-map", "field_map", FIELD_MAP_HELP, type=field_map_flag),
    _flag("--mode", "rollout.mode", "", choices=STEP_MODES),
    _flag("--responses", "synthesis.responses", "samples per question", type=int_at_least(1)),
    _flag("--prompt-format", "synthesis.prompt_format", "raw: the bare question; chat", choices=PROMPT_FORMATS),
    _flag("--stop", "rollout.step_stop", "the step stop string, escapes allowed", type=unescaped),
    _switch("--trim-stop", "rollout.trim_stop", True, "cut the stop string off as SGLang does (the scripts)"),
    _flag("--epsilon0", "monitor.epsilon0", "boundary scale ε0", type=number_at_least(0, strictly=True)),
    _flag("--theta", "monitor.theta", "boundary sharpness θ", type=number_at_least(0)),
    _flag("--top-k", "monitor.entropy_top_k", "teacher tokens of the boundary's entropy", type=int_at_least(1)),
    _switch("--static-boundary", "monitor.adaptive_boundary", False, "H = 0: the constant ε0 the scripts had"),
    _flag("--gamma", "rollout.step_skd_gamma", "step_skd's γ", type=number_at_least(0)),
    _flag("--marker", "synthesis.marker", "text between the student's steps and the correction"),
    _flag("--temperature", TEMPERATURES, "sampling temperature of both models", type=number_at_least(0)),
    _flag("--max-new-tokens", "rollout.max_new_tokens", "tokens a trajectory", type=int_at_least(1)),
    _flag("--max-step-tokens", "rollout.max_step_tokens", "tokens a step", type=int_at_least(1)),
    _flag(
        "--min-correction-tokens",
        "rollout.min_correction_tokens",
        "tokens the correction may write at least",
        type=int_at_least(0),
    ),
    _flag(
        "--batch-size", "synthesis.batch_size", "rows in flight at most (default: as many as fit)", type=int_at_least(1)
    ),
    _flag("--kv-tokens", "rollout.kv_tokens", KV_TOKENS_HELP, type=int_at_least(0)),
    _flag("--seed", "synthesis.seed", "the seed rows' seeds are hashed from", type=int_at_least(0)),
    *BACKEND_FLAGS,
)
SFT_FLAGS = (
    _flag("--model", "model", "the student: a local model folder"),
    _flag("--data", "data", "records JSONL (motab synthesize) or any prompt/completion file"),
    _flag("--epochs", "sft.num_train_epochs", "epochs", type=number_at_least(0, strictly=True)),
    _flag("--learning-rate", "sft.learning_rate", "peak learning rate", type=number_at_least(0, strictly=True)),
    _flag("--max-steps", "sft.max_steps", "stop after N optimizer steps (overrides --epochs)", type=int_at_least(1)),
    _flag("--max-length", "sft.max_length", "tokens per packed row", type=int_at_least(1)),
    _flag("--batch-size", "sft.per_device_train_batch_size", "rows per device and step", type=int_at_least(1)),
    _flag("--gradient-accumulation", "sft.gradient_accumulation_steps", "micro-batches a step", type=int_at_least(1)),
    _switch("--no-packing", "sft.packing", False, "one record per row, padded"),
    _flag("--save-steps", "sft.save_steps", "checkpoint every N steps", type=int_at_least(1)),
    _flag("--seed", "sft.seed", "the run's seed", type=int_at_least(0)),
    _flag("--report-to", "sft.report_to", "experiment tracker: none, tensorboard, trackio, wandb, ..."),
    _flag("--device", "device", "cpu or cuda (default: cuda when available; GPUs by CUDA_VISIBLE_DEVICES)"),
)
EVAL_FLAGS = (
    _flag("--model", "model", "local folder or cached hub id"),
    _flag(
        "--data",
        "data",
        "benchmark files: NAME=PATH ... (NAME one of math500, aime24, aime25, amc23, gpqa_diamond), or one PATH "
        "(JSONL / Parquet / datasets folder) with answers",
        nargs="+",
    ),
    _flag("--field-map", "field_map", FIELD_MAP_HELP, type=field_map_flag),
    _flag("--samples", "evaluation.samples", "samples per problem (avg@n is their mean)", type=int_at_least(1)),
    _flag("--temperature", "evaluation.temperature", "0 is greedy", type=number_at_least(0)),
    _flag("--top-p", "evaluation.top_p", "nucleus sampling (1: off)", type=number_at_least(0, strictly=True)),
    _flag("--max-new-tokens", "evaluation.max_new_tokens", "tokens a completion", type=int_at_least(1)),
    _flag("--pass-k", "evaluation.pass_k", "the k of pass@k, as 1,4 (default 1, powers of two, n)", type=int_list),
    _flag(
        "--prompt-format",
        "evaluation.prompt_format",
        "chat: the chat template, the question and the format's instruction; raw: the bare question",
        choices=PROMPT_FORMATS,
    ),
    _flag(
        "--batch-size",
        "evaluation.batch_size",
        "rows in flight at most (default: as many as fit)",
        type=int_at_least(1),
    ),
    _flag("--kv-tokens", "evaluation.kv_tokens", KV_TOKENS_HELP, type=int_at_least(0)),
    _flag(
        "--answer-format",
        "evaluation.answer_format",
        "a bare PATH's grading: math (math-verify), choice (an option letter), toy (#d)",
    ),
    _flag("--seed", "evaluation.seed", "the samples' seed", type=int_at_least(0)),
    _flag("--device", "device", "cpu, cuda or cuda:N (default: cuda when available)"),
    _flag("--dtype", "dtype", "float32 or bfloat16 (default: bfloat16 on CUDA)"),
    _flag("--backend", "backend.name", "paged: our engine; vllm: a vLLM engine", choices=BACKENDS),
    _flag("--tp", "backend.teacher_tp", "vllm: GPUs the model is split over", type=int_at_least(1)),
    _flag(
        "--gpu-memory",
        "backend.teacher_memory",
        "vllm: the model's share of a GPU's memory",
        type=number_at_least(0, strictly=True),
    ),
)
# Defaults of ``motab eval`` (``--preset``). "paper": the authors' EvalScope settings (RESEARCH.md):
# temperature 0.6, top-p 0.95, 32,768 tokens, 4 samples a problem and 1 on MATH-500, the chat template.
# "toy": the toy task's #d answers, greedy, from the bare question.
EVAL_PRESETS = {
    "paper": {
        "evaluation": dict(temperature=0.6, top_p=0.95, max_new_tokens=32768, samples=None, prompt_format="chat")
    },
    "toy": {"evaluation": dict(answer_format="toy", max_new_tokens=96, prompt_format="raw")},
}


def preset_sections(values: dict) -> dict:
    """A synthesize preset written as flag values (``stop``, ``temperature``, ...), as the sections
    of a run file: the defaults a run file, flags and --set then override. A preset runs step_motab."""
    flags = {flag.dest: flag for flag in SYNTHESIZE_FLAGS}
    raw = {"rollout": {"mode": "step_motab"}}
    for key, value in values.items():
        for option in flags[key].options:
            set_option(raw, option, value)
    return raw


# Defaults of ``motab synthesize``. "paper": the reference scripts'; "toy": the toy task's
# (``motab.toy.task.PAPER_PRESET``).
SYNTHESIS_PRESETS = {"paper": preset_sections(PAPER_PRESET), "toy": preset_sections(TOY_PRESET)}


def add_flags(parser: argparse.ArgumentParser, flags: tuple[Flag, ...], preset: dict | None = None) -> None:
    """``flags`` on ``parser``, each unset by default (None: the configuration decides); the help
    says the default: the preset's where one applies, else the configuration's."""
    for flag in flags:
        default = _preset_value(preset, flag.options[0]) if preset else None
        default = default_option(flag.options[0]) if default is None else default
        text = flag.help
        if default is not None and "action" not in flag.kwargs:
            text = f"{text} (default {json.dumps(default, ensure_ascii=False)})" if text else f"default {default}"
        parser.add_argument(flag.name, dest=flag.dest, default=None, help=text, **flag.kwargs)


def flag_options(args: argparse.Namespace, flags: tuple[Flag, ...]) -> dict:
    """The options the given flags set, by option name (an unset flag sets nothing)."""
    return {option: getattr(args, flag.dest) for flag in flags for option in flag.options}


def _preset_value(preset: dict, option: str):
    section, _, name = option.partition(".")
    return preset.get(section, {}).get(name) if name else preset.get(section)


def _resume_arguments(parser: argparse.ArgumentParser, resumed: str, overwritten: str) -> None:
    """--resume and --overwrite, as every command that writes an output takes them."""
    parser.add_argument("--resume", action="store_true", help=f"continue {resumed}")
    parser.add_argument("--overwrite", action="store_true", help=f"start again: {overwritten}")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run file (see `motab --help`); flags and --set override it")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override an option")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    add_flags(parser, TRAIN_FLAGS)
    _resume_arguments(parser, "from the latest checkpoint", "remove the run's checkpoints in a used output folder")
    parser.set_defaults(run=run_train, flags=TRAIN_FLAGS)


def _rollout_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    add_flags(parser, ROLLOUT_FLAGS)
    parser.add_argument("--limit", type=int_at_least(1), default=16, help="prompts to roll out (default 16)")
    parser.add_argument("--out", required=True, help="trajectories JSONL")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16, help="rows in flight at most (default 16)")
    parser.add_argument("--render", help="PNG of the first trajectory: scores, boundary, teacher tokens, backtracks")
    _resume_arguments(parser, "an interrupted rollout into the same --out", "remove an existing --out")
    _plan_argument(parser)
    parser.set_defaults(run=run_rollout, flags=ROLLOUT_FLAGS)


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--train", type=int_at_least(1), default=2000, help="train problems (default 2000)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="the warm start's seed (default 0)")
    parser.add_argument(
        "--warm-steps", type=int_at_least(0), default=None,
        help="the warm start's steps (default: the demo's; fewer make a weaker student in less time; 0: untrained)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace the splits, teacher and student in OUT")
    parser.set_defaults(run=run_prepare)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="motab-demo", help="report folder (default motab-demo)")
    parser.add_argument("--seeds", type=int_at_least(1), default=1, help="seeds per method; the table shows mean ± std")
    parser.add_argument("--steps", type=int_at_least(1), help="training steps per method")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about two minutes")
    parser.add_argument("--device", default="cpu")
    _resume_arguments(parser, "an interrupted demo in --out (its finished runs kept)", "remove the demo in --out")
    parser.set_defaults(run=run_demo)


def _synthesize_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    parser.add_argument(
        "--preset", choices=sorted(SYNTHESIS_PRESETS), default="paper", help="defaults (paper; toy: the toy task)"
    )
    add_flags(parser, SYNTHESIZE_FLAGS, SYNTHESIS_PRESETS["paper"])
    parser.add_argument("--out", required=True, help="records JSONL")
    parser.add_argument("--limit", type=int_at_least(1), help="first N questions only")
    _resume_arguments(parser, "an interrupted run into the same --out", "remove an existing --out and its parts")
    parser.add_argument("--render", help="PNG of the first record with a breach: V and ε per step, t* marked")
    _plan_argument(parser)
    parser.set_defaults(run=run_synthesize, flags=SYNTHESIZE_FLAGS)


def _sft_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    add_flags(parser, SFT_FLAGS)
    parser.add_argument("--out", required=True, help="folder for checkpoints and the final model")
    _resume_arguments(parser, "from the latest checkpoint in --out", "remove the run's checkpoints and model in --out")
    parser.set_defaults(run=run_sft, flags=SFT_FLAGS)


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    parser.add_argument(
        "--preset",
        choices=sorted(EVAL_PRESETS),
        help="defaults: paper (temperature 0.6, top-p 0.95, 32,768 tokens, 4 samples and 1 on math500); toy",
    )
    add_flags(parser, EVAL_FLAGS)
    parser.add_argument("--limit", type=int_at_least(1), help="first N problems of each benchmark only")
    parser.add_argument("--out", required=True, help="folder for results.json, results.md and <benchmark>.jsonl")
    _resume_arguments(parser, "an interrupted eval in --out", "remove the results of a used --out")
    _plan_argument(parser)
    parser.set_defaults(run=run_eval, flags=EVAL_FLAGS)


# Each command's parser: what adds its arguments, and its help and description.
COMMAND_PARSERS = {
    "train": (
        _train_arguments,
        dict(
            help="distil a student from a teacher (MOTAB or a baseline)",
            description="Distils the student from the teacher on the data set's prompts. "
            "Checkpoints go to train.output_dir; --resume continues from the latest.",
        ),
    ),
    "rollout": (
        _rollout_arguments,
        dict(
            help="roll out prompts and save the trajectories",
            description="Writes one JSON line per trajectory; --render draws one as a PNG.",
        ),
    ),
    "demo": (
        _demo_arguments,
        dict(
            help="MOTAB and its baselines on the toy task, with the shipped teacher (CPU, minutes)",
            description="Distils a small student from the shipped toy teacher with the online methods (off_policy, "
            "on_policy, skd, adaswitch, motab) and the paper's pipeline and its baselines (step_motab, step_skd, "
            "teacher_steps: synthesis, then SFT) at the same budget, evaluates each on the held-out test split and "
            "writes a report.",
        ),
    ),
    "prepare": (
        _prepare_arguments,
        dict(
            help="a toy folder for the pipeline's commands: the splits, the shipped teacher, a warm-started student",
            description="Writes OUT/{train,validation,test}.jsonl (LIMO-style toy problems), OUT/teacher (the shipped "
            "toy teacher) and OUT/student (the demo's warm-started student), for motab synthesize, sft, eval, "
            "rollout and train on the toy task.",
        ),
    ),
    "synthesize": (
        _synthesize_arguments,
        dict(
            help="the paper's data synthesis: step-level rollouts with rewinds, written as SFT records",
            description="Rolls out --responses samples per question step by step (step_motab: the oracle value "
            "against the entropy boundary, a rewind to the TD-error root cause, the teacher's correction; or the "
            "scripts' baselines step_skd and teacher_steps) and writes one JSON record per sample. Settings: the "
            "preset, then --config, then the flags, then --set. Resumable (--resume); under torchrun each rank "
            "takes a share and rank 0 merges.",
        ),
    ),
    "sft": (
        _sft_arguments,
        dict(
            help="supervised fine-tuning on synthesized records (TRL's SFTTrainer)",
            description="Fine-tunes --model on the prompt/completion records (loss on the completion only) with "
            "the reference scripts' defaults: lr 5e-5, 6 epochs, cosine to 1e-6, 5 %% warm-up, weight decay 0.1, "
            "Adam β2 0.95, packing. Checkpoints are HF Trainer's; --resume continues from the latest.",
        ),
    ),
    "eval": (_eval_arguments, dict(help="accuracy of a model on a benchmark with \\boxed{} answers")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="motab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, text) in COMMAND_PARSERS.items():
        add_arguments(commands.add_parser(name, **text))
    return parser


def load_model(name: str, dtype, device, role: str = "model"):
    """A causal LM and its tokenizer from disk (a folder or a cached hub id): never a download, never
    a hang. What a user can mend (a missing folder, an uncached id, unreadable weights) is a
    ConfigError naming the model's ``role`` (student, teacher) and the file. A local folder's files
    were checked by ``check_sources`` before anything heavy loaded; every command calls it first."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from motab.runs import without_hf_bars

    tokenizer = load_model_tokenizer(name, role)
    try:
        with without_hf_bars():  # transformers' own loading bar would break into the command's bars
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=dtype)
    except SafetensorError as error:  # a cached hub model's weights (a folder's were checked above)
        raise ConfigError(f"the {role}'s weights ({name}) cannot be read: {error}; download them again") from error
    except OSError as error:
        raise _not_loadable(name, role, error) from error
    return model.to(device), tokenizer


def load_model_tokenizer(name: str, role: str = "model"):
    """The tokenizer of a model folder or cached hub id, from disk only; what a user can mend is a
    ConfigError, as in ``load_model``."""
    from motab.models import load_tokenizer

    try:
        return load_tokenizer(name)
    except OSError as error:
        raise _not_loadable(name, role, error) from error


def _not_loadable(name: str, role: str, error: OSError) -> ConfigError:
    if local_model_folder(name, role) is None:
        return ConfigError(
            f"the {role} {name!r} is neither a local folder nor in the Hugging Face cache, and nothing is "
            f"downloaded: pass a model folder, or fetch it first with `hf download {name}`"
        )
    return ConfigError(f"cannot load the {role} from {name}: {str(error).splitlines()[0]}")


def local_model_folder(name: str, role: str) -> Path | None:
    """The folder ``name`` names, or None for what can only be a hub id; a path that is missing, a
    file or a folder without config.json is refused here rather than taken for a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"the {role} folder {name} has no config.json: it is not a saved model")
        return path
    if path.exists():
        raise ConfigError(f"the {role} {name} is a file; expected a model folder (config.json, weights, tokenizer)")
    # a hub id is "name" or "namespace/name"; anything else can only be a path
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/"):
        raise ConfigError(f"the {role} folder {name} does not exist")
    return None


# A saved tokenizer holds one of these (fast, SentencePiece, byte-level BPE, WordPiece, Mistral's tekken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")


def check_model_files(folder: Path, role: str) -> None:
    """Refuses a model folder with a safetensors file whose header or length is broken (truncated,
    or overwritten) or a JSON file (config, tokenizer, generation config) that does not parse,
    naming the file, and a folder without a tokenizer. Reads the safetensors headers only, without torch."""
    from safetensors import SafetensorError, safe_open

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"the {role} folder {folder} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...): save it beside "
            "the model (tokenizer.save_pretrained(folder))"
        )
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="numpy"):
                pass
        except SafetensorError as error:
            raise ConfigError(
                f"the {role}'s weights {file} cannot be read ({error}): the file is truncated or corrupt; "
                "save or download the model again"
            ) from error
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(
                f"the {role}'s file {file} is not valid JSON ({error}): the file is truncated or corrupt; "
                "save or download the model again"
            ) from error


def check_sources(models: dict[str, str], data: str | None, field_map: str | FieldMap = "auto") -> None:
    """Refuses, before torch loads, a model (named by role) that is not there or whose weights are
    broken, and a data set (None: checked by the caller) that is missing, unreadable or lacks the
    fields of ``field_map``. The records are read once more later, with the tokenizer: cheap beside
    loading the models."""
    from motab.data import load_records, resolve_field_map

    for role, name in models.items():
        folder = local_model_folder(name, role)
        if folder is not None:
            check_model_files(folder, role)
    if data is None:
        return
    try:
        resolve_field_map(load_records(data)[0], field_map)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error


def check_writable(path: str | Path, what: str, *, folder: bool) -> None:
    """Refuses an output path the command could not write, before any model loads: the nearest
    existing folder on its way must be a folder this process may write to, and an existing path must
    be of the right kind (a folder for ``folder``, else a file) and writable."""
    path = Path(path)
    if path.exists():
        if path.is_dir() != folder:
            raise ConfigError(f"{what} {path} is {'a file, not a folder' if folder else 'a folder, not a file'}")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{what} {path} is not writable")
    nearest = path if folder and path.exists() else path.parent
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {nearest} is a file")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} cannot be written: {nearest} is not writable")


def _load_problems(path: str, tokenizer, **options):
    """motab.data.load_problems, a bad data set (missing, unreadable, fields the map lacks) a ConfigError."""
    from motab.data import load_problems

    try:
        return load_problems(path, tokenizer, **options)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error


def _field_map(raw: dict) -> str | FieldMap:
    return parse_field_map(raw.get("field_map", "auto"))


def _setup(raw, rollout: RolloutConfig):
    device, dtype = _device_and_dtype(raw.get("device"), raw.get("dtype"))
    _check_graphs_device(rollout.cuda_graphs, device)
    student, tokenizer = load_model(raw["student"], dtype, device, "student")
    teacher, teacher_tokenizer = load_model(raw["teacher"], dtype, device, "teacher")
    _check_tokenizers(tokenizer, teacher_tokenizer)
    problems, skipped = _load_problems(
        raw["data"],
        tokenizer,
        field_map=_field_map(raw),
        max_prompt_tokens=raw.get("max_prompt_tokens"),
    )
    if skipped:
        print(f"skipped {skipped} prompts longer than max_prompt_tokens={raw.get('max_prompt_tokens')}")
    return student, teacher, tokenizer, problems


def _init_distributed(raw: dict) -> int:
    """Joins the process group when launched by torchrun / accelerate launch; returns the rank."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.get_rank() if dist.is_initialized() else 0
    cuda = torch.cuda.is_available() and raw.get("device", "cuda") != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        raw["device"] = f"cuda:{local}"
    return dist.get_rank()


def _raw_config(args, defaults: dict | None = None) -> dict:
    """The run's configuration: ``defaults`` (a preset), the YAML file, the command's flags, --set."""
    return resolve_config(
        args.config, flag_options(args, args.flags), args.set, command=args.command, defaults=defaults
    )


def run_train(args) -> int:
    raw = _raw_config(args)
    train, _ = build_configs(raw)
    warn_silent_mistakes(train=train)
    check_sources({"student": raw["student"], "teacher": raw["teacher"]}, raw["data"], _field_map(raw))
    check_writable(train.output_dir, "train.output_dir", folder=True)
    from motab.runs import check_run_folder  # (no torch)

    check_run_folder(train.output_dir, args.resume, args.overwrite)  # before any model loads
    # torch and transformers load only now: a mistake in the configuration shows in a fraction of a second
    from motab.trainer import DistillationTrainer, Trackers

    rank = _init_distributed(raw)
    Trackers(train, rank)  # an unknown tracker, or one whose package is missing, refused before the models load
    student, teacher, tokenizer, problems = _setup(raw, train.rollout)
    train = resolve_training(train, tokenizer)
    if rank == 0:  # the mode's own monitor settings, and EOS, the vocabulary size and the step delimiters filled in
        print_resolved(raw, train)
    trainer = DistillationTrainer(student, teacher, tokenizer, problems, train)
    if rank == 0:  # rewritten by each invocation (a resume records its own command)
        from motab.runs import write_run_record

        sources = {key: raw[key] for key in ("student", "teacher", "data")}
        write_run_record(Path(train.output_dir) / "run.json", **sources, settings=asdict(train))
    # a checkpoint is named only once its rename succeeded (a save cut short leaves the previous one)
    args.kept = lambda: (
        f"saved {trainer.last_checkpoint}; continue with --resume" if trainer.last_checkpoint else "no checkpoint saved"
    )
    trainer.train(resume=args.resume, overwrite=args.overwrite, progress=rank == 0)
    print(f"done: {train.output_dir}/checkpoint-{trainer.step}")
    return 0


def run_rollout(args) -> int:
    raw = _raw_config(args)
    _, rollout = build_configs(raw)
    check_sources({"student": raw["student"], "teacher": raw["teacher"]}, raw["data"], _field_map(raw))
    out = Path(args.out)
    check_writable(out, "--out", folder=False)  # before the generation, which the write would otherwise lose
    if args.render:
        check_writable(args.render, "--render", folder=False)
    if args.plan:
        from motab.models import load_tokenizer

        tokenizer = load_tokenizer(raw["student"])
        problems, _ = _load_problems(raw["data"], tokenizer, field_map=_field_map(raw), limit=args.limit)
        longest = max(len(p.prompt_ids) for p in problems)
        sources = {"student": raw["student"], "teacher": raw["teacher"]}
        return _print_plan(args.plan, raw, sources, rollout, args.batch_size, longest)
    from motab.runs import PartsOutput

    output = PartsOutput(out)
    output.check(args.resume, args.overwrite)  # before any model loads
    from motab.engine import Trajectory, rollout_in_batches
    from motab.plots import render_trajectory

    student, teacher, tokenizer, problems = _setup(raw, rollout)
    rollout, _ = resolve(rollout, tokenizer)
    print_resolved(raw, rollout)
    prompts = [p.prompt_ids for p in problems[: args.limit]]
    memory = ("kv_tokens", "kv_memory")  # change no trajectory
    settings = dict(
        rollout={k: v for k, v in asdict(rollout).items() if k not in memory},
        student=raw["student"], teacher=raw["teacher"], data=raw["data"], prompts=len(prompts),
    )  # fmt: skip
    output.prepare(settings, args.resume, args.overwrite)
    done = {record["index"] for record in output.records()}
    todo = [i for i in range(len(prompts)) if i not in done]
    args.kept = lambda: output.said("trajectories")
    with output.appending() as sink:

        def keep(index: int, trajectory) -> None:
            """A row's trajectory, on disk as soon as it finishes (a kill loses only rows in flight)."""
            record = {"index": todo[index]} | trajectory.to_dict() | {"text": tokenizer.decode(trajectory.tokens)}
            append_line(sink, record)

        # a bar on stderr when it is a terminal; row i keeps seed i whatever the batches or a resume
        rollout_in_batches(
            student, teacher, [prompts[i] for i in todo], rollout, batch_size=args.batch_size, seeds=todo,
            tokenizer=tokenizer, on_finished=keep,
        )  # fmt: skip
    written = output.merge(lambda record: record["index"], list(range(len(prompts))))
    print(f"wrote {len(written)} trajectories to {out} ({len(todo)} new)")
    if args.render:
        render_trajectory(Trajectory.from_dict(written[0]), args.render)
        print(f"rendered the first one to {args.render}")
    return 0


def run_eval(args) -> int:
    if isinstance(args.data, list):
        args.data = _eval_data_flag(args.data)
    raw = _raw_config(args, EVAL_PRESETS.get(args.preset))
    settings = build_section("evaluation", raw.get("evaluation"))
    check_sources({"model": raw["model"]}, None)
    check_writable(args.out, "--out", folder=True)  # before the generation, which the write would otherwise lose
    import motab.demo  # noqa: F401  (registers the toy task's answer format, "toy")
    from motab.evaluate import get_answer_format
    from motab.evaluate.run import check_output, pass_ks, samples_of

    benchmarks = _eval_benchmarks(raw, settings, args.limit)  # every file read and checked before a model loads
    for benchmark in benchmarks:
        try:
            get_answer_format(benchmark.answer_format)
        except ValueError as error:
            raise ConfigError(f"evaluation.answer_format: {error}") from error
        pass_ks(settings, samples_of(settings, benchmark.name))
    most = max(samples_of(settings, benchmark.name) for benchmark in benchmarks)
    warn_silent_mistakes(sampling=dict(samples=most, temperature=settings.temperature, what="--samples"))
    backend = build_section("backend", raw.get("backend"))
    if args.plan:
        from motab.config import RolloutConfig
        from motab.evaluate.run import prompt_of
        from motab.models import load_tokenizer

        tokenizer = load_tokenizer(raw["model"])
        longest = max(
            len(prompt_of(tokenizer, p.question, get_answer_format(b.answer_format), settings.prompt_format))
            for b in benchmarks
            for p in b.problems
        )
        config = RolloutConfig(mode="off_policy", max_new_tokens=settings.max_new_tokens, kv_tokens=settings.kv_tokens)
        return _print_plan(args.plan, raw, {"model": raw["model"]}, config, settings.batch_size, longest)
    check_output(args.out, args.resume, args.overwrite)
    if settings.prompt_format == "chat":
        if not getattr(load_model_tokenizer(raw["model"]), "chat_template", None):
            raise ConfigError(
                f"{raw['model']}'s tokenizer has no chat template: evaluation.prompt_format chat needs one "
                "(--prompt-format raw reads the bare question)"
            )
    if backend.name == "vllm":
        model, tokenizer = _vllm_engine(raw, "model", backend)
    else:
        device, dtype = _device_and_dtype(raw.get("device"), raw.get("dtype"))
        model, tokenizer = load_model(raw["model"], dtype, device)
    from motab.evaluate import evaluate_benchmarks

    samples = Path(args.out) / ".parts" / "samples.jsonl"
    args.kept = lambda: kept_line(count_lines(samples), "samples", samples.parent)
    report = evaluate_benchmarks(
        model, tokenizer, benchmarks, settings, args.out, model_name=raw["model"], resume=args.resume,
        overwrite=args.overwrite, progress=None, flags=CLI_FLAGS,  # a bar when stderr is a terminal
    )  # fmt: skip
    for name, result in report.results.items():
        s = result.score
        figures = ", ".join(f"pass@{k} {100 * v:.1f}" for k, (v, _) in s.pass_at.items() if k > 1)
        print(
            f"{name}: avg@{s.samples} {100 * s.avg:.1f} ± {100 * s.avg_se:.1f} on {s.problems} problems"
            + (f", {figures}" if figures else "")
        )
        if s.answered == 0:
            grading = next(b.answer_format for b in benchmarks if b.name == name)
            print(f"warning: no completion of {name} gave an answer that the {grading} format could read")
    if len(report.results) > 1:
        mean = report.overall
        print(f"overall (benchmarks weighted equally): {100 * mean.avg:.1f} ± {100 * mean.avg_se:.1f}")
    print(f"wrote {Path(args.out) / 'results.json'} and results.md")
    return 0


def _eval_data_flag(items: list[str]) -> str | dict:
    """``--data``'s values as the configuration's ``data``: one path, or benchmark names to paths."""
    from motab.evaluate.benchmarks import parse_data_sources

    try:
        pairs = parse_data_sources(items)
    except ValueError as error:
        raise ConfigError(f"--data: {error}") from error
    return pairs[0][1] if pairs[0][0] is None else dict(pairs)


def _eval_benchmarks(raw: dict, settings, limit: int | None) -> list:
    """The benchmarks of eval's ``data``, each file read and its fields checked (one line for a
    missing file, a missing answer field or an unknown benchmark)."""
    from motab.evaluate.benchmarks import load_benchmark, parse_data_sources

    try:
        pairs = parse_data_sources(raw["data"])
        return [
            load_benchmark(name, path, field_map=_field_map(raw), answer_format=settings.answer_format, limit=limit)
            for name, path in pairs
        ]
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error


def run_synthesize(args) -> int:
    raw = _raw_config(args, SYNTHESIS_PRESETS[args.preset])
    _, config = build_configs(raw)
    options = build_section("synthesis", raw.get("synthesis"))
    policy = policy_of(config.mode)
    if not policy.in_steps:
        raise ConfigError(f"rollout.mode: synthesize runs a step mode ({', '.join(STEP_MODES)}), not {config.mode!r}")
    if policy.needs_student and "student" not in raw:
        raise ConfigError(f"--student is required for mode {config.mode}")
    hottest = max(config.teacher_sampling.temperature, config.student_sampling.temperature * policy.needs_student)
    warn_silent_mistakes(sampling=dict(samples=options.responses, temperature=hottest, what="--responses"))
    roles = ("student", "teacher") if policy.needs_student else ("teacher",)
    check_sources({role: raw[role] for role in roles}, raw["data"], _field_map(raw))
    out = Path(args.out)
    check_writable(out, "--out", folder=False)
    if args.render:
        check_writable(args.render, "--render", folder=False)
    # torch and transformers load only now: a mistake in the options shows in a fraction of a second
    from motab.runs import PartsOutput
    from motab.synthesis import load_questions, synthesize

    PartsOutput(out).check(args.resume, args.overwrite)  # before any model loads
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        questions = load_questions(raw["data"], _field_map(raw), args.limit)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    backend = build_section("backend", raw.get("backend"))
    if args.plan:
        from motab.models import load_tokenizer
        from motab.synthesis import prompt_text

        tokenizer = load_tokenizer(raw["teacher"])
        longest = max(
            len(tokenizer(prompt_text(tokenizer, q.text, options.prompt_format))["input_ids"]) for q in questions
        )
        sources = {role: raw[role] for role in roles}
        return _print_plan(args.plan, raw, sources, config, options.batch_size, longest)
    rank = _init_distributed(raw)
    world = _world_size()
    if backend.name == "vllm":
        student, teacher, tokenizer = _vllm_engines(raw, policy.needs_student, backend, config)
    else:
        student, teacher, tokenizer = _paged_models(raw, policy.needs_student, config)
    config, _ = resolve(config, tokenizer)
    if rank == 0:
        print_resolved(raw, config, synthesis=options, backend=backend)
    barrier = _barrier() if world > 1 else None
    output = PartsOutput(out)
    args.kept = lambda: output.said("records")
    provenance = {role: raw[role] for role in roles} | {"data": raw["data"]}
    summary = synthesize(
        student, teacher, tokenizer, questions, out, config, options,
        resume=args.resume, overwrite=args.overwrite, rank=rank, world_size=world, barrier=barrier,
        progress=rank == 0, provenance=provenance, flags=CLI_FLAGS,
    )  # fmt: skip
    if rank == 0:
        rate = summary.total_breaches / max(summary.total, 1)
        print(
            f"wrote {out}: {summary.total} records ({summary.records} new, {summary.skipped} already there), "
            f"breach rate {rate:.1%}, {summary.tokens / max(summary.seconds, 1e-9):.0f} tokens/s"
        )
        if args.render:
            from motab.plots import render_steps

            records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
            chosen_record = next((r for r in records if r["breach"]), records[0])
            render_steps(chosen_record, args.render)
            print(f"rendered record {chosen_record['id']}/{chosen_record['response_index']} to {args.render}")
    return 0


def _paged_models(raw: dict, needs_student: bool, config):
    """The student (None when the mode needs none), the teacher and the tokenizer, on the device."""
    device, dtype = _device_and_dtype(raw.get("device"), raw.get("dtype"))
    _check_graphs_device(config.cuda_graphs, device)
    teacher, tokenizer = load_model(raw["teacher"], dtype, device, "teacher")
    student = None
    if needs_student:
        student, student_tokenizer = load_model(raw["student"], dtype, device, "student")
        _check_tokenizers(student_tokenizer, tokenizer)
        tokenizer = student_tokenizer
    return student, teacher, tokenizer


def _vllm_engine(raw: dict, role: str, backend):
    """One vLLM engine (eval's model) and its tokenizer."""
    from motab.backends.vllm import load_engine
    from motab.models import load_tokenizer

    paths, dtype = _vllm_sources(raw, (role,))
    return load_engine(paths[role], role, backend, dtype), load_tokenizer(paths[role])


def _vllm_engines(raw: dict, needs_student: bool, backend, config):
    """The student's and teacher's vLLM engines (the student None when the mode needs none) and the
    tokenizer; vLLM picks its own device."""
    from motab.backends.vllm import load_engines
    from motab.models import load_tokenizer

    paths, dtype = _vllm_sources(raw, ("student", "teacher") if needs_student else ("teacher",))
    tokenizer = load_tokenizer(paths["teacher"])
    if needs_student:
        student_tokenizer = load_tokenizer(paths["student"])
        _check_tokenizers(student_tokenizer, tokenizer)
        tokenizer = student_tokenizer
    config, _ = resolve(config, tokenizer)
    student, teacher = load_engines(paths.get("student"), paths["teacher"], backend, config, dtype)
    return student, teacher, tokenizer


def _vllm_sources(raw: dict, roles: tuple[str, ...]) -> tuple[dict[str, str], str]:
    """The models' folders (or cached hub ids) by role and the dtype vLLM loads them in; refuses a
    missing vLLM (how to install it) and a device (vLLM places its engines) before anything loads."""
    from motab.backends.vllm import import_vllm

    import_vllm()
    if raw.get("device"):
        raise ConfigError("device: vLLM places its engines itself (backend.teacher_tp, backend.student_tp)")
    paths = {role: str(local_model_folder(raw[role], role) or raw[role]) for role in roles}
    return paths, check_dtype(raw["dtype"]) if raw.get("dtype") else "auto"


def run_sft(args) -> int:
    raw = _raw_config(args)
    options = build_section("sft", raw.get("sft"))
    folder = local_model_folder(raw["model"], "model")
    if folder is None:  # a hub id: SFTTrainer is given a folder, never a download
        raise ConfigError(
            f"the model {raw['model']!r} is not a local folder: sft fine-tunes a saved model folder "
            f"(`hf download {raw['model']} --local-dir DIR` makes one)"
        )
    check_model_files(folder, "model")
    check_writable(args.out, "--out", folder=True)
    device = raw.get("device")
    if device is not None and device.startswith("cuda:"):
        raise ConfigError(
            f"device {device}: sft runs on the GPUs the Hugging Face Trainer sees (all visible ones); choose them "
            "with CUDA_VISIBLE_DEVICES and pass --device cuda (or cpu)"
        )
    if device is not None:
        _device_and_dtype(device, None)  # a device that is not there is refused before anything loads
    from motab.sft import checkpoints, resume_point, run_sft, to_dataset

    try:
        resume_point(args.out, args.resume, args.overwrite, CLI_FLAGS)  # a used folder: said before anything loads
        to_dataset(raw["data"])
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error

    def kept() -> str:
        saved = checkpoints(args.out)
        return f"kept {saved[-1]}; continue with --resume" if saved else "no checkpoint saved yet (one a save_steps)"

    args.kept = kept
    result = run_sft(
        raw["model"], raw["data"], args.out, options, resume=args.resume, overwrite=args.overwrite,
        device="cpu" if device == "cpu" else None, flags=CLI_FLAGS,
    )  # fmt: skip
    print(f"done: {result.global_step} steps, training loss {result.training_loss:.4f}; model saved in {args.out}")
    return 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier():
    import torch.distributed as dist

    return dist.barrier


def _plan_argument(parser: argparse.ArgumentParser) -> None:
    """``--plan [GIB]``: the chosen device's plan (the value "here"), or a GPU of GIB GiB's."""
    parser.add_argument(
        "--plan", nargs="?", const="here", metavar="GIB", type=_plan_memory,
        help="print the paged engine's KV plan from the models' config.json (no weights loaded) and exit: for "
        "this run's device, or for a GPU of GIB GiB",
    )  # fmt: skip


def _plan_memory(text: str) -> str | float:
    """``--plan``'s value: "here" (argparse passes the bare flag's const through the type too), or
    a GPU's GiB, a positive number."""
    return text if text == "here" else number_at_least(0, strictly=True)(text)


def _print_plan(
    memory: str | float, raw: dict, sources: dict[str, str], config, rows: int | None, longest_prompt: int
) -> int:
    """``--plan``: the paged engine's KV pool and rows in flight, from the models' config.json."""
    import torch
    from transformers import AutoConfig

    from motab.engine.plan import GIB, model_plan, plan

    if memory == "here":
        device, dtype = _device_and_dtype(raw.get("device"), raw.get("dtype"))
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            where, memory_bytes = f"{torch.cuda.get_device_name(device)} ({free / GIB:.1f} GiB free)", free
        else:
            where, memory_bytes = "the CPU", None
    else:
        dtype = getattr(torch, check_dtype(raw["dtype"])) if raw.get("dtype") else torch.bfloat16
        where, memory_bytes = f"a GPU of {memory:g} GiB", int(memory * GIB)
    try:
        configs = {
            role: AutoConfig.from_pretrained(str(source), local_files_only=True) for role, source in sources.items()
        }
    except (OSError, ValueError) as error:
        raise ConfigError(f"--plan reads each model's config.json: {error}") from error
    models = [model_plan(role, str(sources[role]), c, dtype) for role, c in configs.items()]
    try:
        result = plan(models, config, prompt_tokens=longest_prompt, rows=rows, device=f"{where}, {str(dtype)[6:]}",
                      memory_bytes=memory_bytes)  # fmt: skip
    except ValueError as error:
        raise ConfigError(str(error)) from error
    print(result.table(longest_prompt, config.max_new_tokens))
    return 0


def _device_and_dtype(device: str | None, dtype: str | None):
    """The torch device and dtype to run on: CUDA and bfloat16 when there is a GPU, else the CPU and
    float32; a device asked for that is not there is refused."""
    import torch

    device = torch.device(check_device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        _check_cuda_device(device)
    name = check_dtype(dtype) if dtype else ("bfloat16" if device.type == "cuda" else "float32")
    return device, getattr(torch, name)


def _check_graphs_device(cuda_graphs: bool, device) -> None:
    if cuda_graphs and device.type != "cuda":
        raise ConfigError(f"rollout.cuda_graphs needs a CUDA device; this run is on {device}")


def _check_cuda_device(device) -> None:
    """Refuses a CUDA device torch cannot see (no GPU, a CPU-only build of torch, a bad index)."""
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no GPU visible to torch"
        raise ConfigError(f"device {device} asked for, but there is no CUDA device ({build}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")


def _check_tokenizers(student_tokenizer, teacher_tokenizer) -> None:
    from motab.engine import check_same_tokenizer

    try:
        check_same_tokenizer(student_tokenizer, teacher_tokenizer)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def run_prepare(args) -> int:
    check_writable(args.out, "OUT", folder=True)
    from motab.demo.prepare import check_prepare_folder, prepare
    from motab.demo.run import FULL

    check_prepare_folder(args.out, args.overwrite)
    steps = FULL.warm_steps if args.warm_steps is None else args.warm_steps
    args.kept = lambda: f"nothing kept: {args.out} is as it was (prepare moves its files in at the end)"
    print(f"warm-starting the student: {steps} steps", flush=True)
    prepare(
        args.out, train=args.train, seed=args.seed, warm_steps=steps, overwrite=args.overwrite,
        log=lambda line: print(f"  warm start {line}", flush=True),
    )  # fmt: skip
    print(f"wrote {args.out}: train/validation/test.jsonl, teacher/, student/")
    return 0


def run_demo(args) -> int:
    _device_and_dtype(args.device, None)  # a device that is not there is refused before anything trains
    from motab.demo import run_demo as demo
    from motab.demo.run import PARTS, check_demo_folder, kept_runs

    check_writable(args.out, "--out", folder=True)
    check_demo_folder(args.out, args.resume, args.overwrite)
    args.kept = lambda: kept_line(kept_runs(args.out), "runs", Path(args.out) / PARTS)
    demo(
        args.out, seeds=args.seeds, steps=args.steps, quick=args.quick, device=args.device, resume=args.resume,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(f"report: {args.out}/results.json, accuracy.png, rollout.png")
    return 0


def print_resolved(raw: dict, config, **sections) -> None:
    """Prints the run's configuration as it runs: the top-level keys, the ``TrainConfig`` (or the
    ``RolloutConfig``) as ``motab.policy.resolve`` settled it — the mode's own monitor settings, what
    the tokenizer filled in — and any other section built (``synthesis=...``). Lists of ids on one
    line each."""
    dumped = yaml.dump(_printable(raw, config, sections), Dumper=_ConfigDumper, sort_keys=False, width=120)
    print("resolved config:\n" + dumped)


class _ConfigDumper(yaml.SafeDumper):
    """YAML as a config is written: lists (of ids) on one line, texts with line breaks in escapes."""


_ConfigDumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True))
_ConfigDumper.add_representer(
    str,
    lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"' if "\n" in data else None),
)


def _printable(raw: dict, config, sections: dict) -> dict:
    shown = {k: v for k, v in raw.items() if k in TOP_LEVEL}
    shown |= {name: asdict(value) for name, value in sections.items()}
    values = asdict(config)
    if "rollout" in values:  # a TrainConfig
        shown["train"] = {k: v for k, v in values.items() if k != "rollout"}
        values = values["rollout"]
    shown["rollout"] = values
    return json.loads(json.dumps(shown, default=str))


if __name__ == "__main__":
    sys.exit(main())
