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
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from motab.config import (
    FIELD_MAP_HELP,
    TOP_LEVEL,
    ConfigError,
    FieldMap,
    RolloutConfig,
    apply_overrides,
    build_configs,
    check_device,
    check_dtype,
    parse_field_map,
    resolve_config,
)
from motab.toy.task import PAPER_PRESET as TOY_PRESET

ANSWER_FORMATS = ("boxed", "toy")
# Defaults of ``motab synthesize`` (flags and --set override them). "paper": the reference scripts'
# stop string, marker, budgets and sampling; "toy": the toy task's (``motab.toy.task.PAPER_PRESET``).
SYNTHESIS_PRESETS = {
    "paper": dict(
        stop=".\n\n",
        marker="However,",
        max_new_tokens=32768,
        max_step_tokens=8192,
        min_correction_tokens=256,
        temperature=0.6,
    ),
    "toy": TOY_PRESET,
}


def main(argv: list[str] | None = None) -> int:
    """Runs one command; a user's mistake (ConfigError) is printed as one line and gives 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warnings(args.command, warnings.showwarning)
            return args.run(args)
    except ConfigError as error:
        print(f"motab {args.command}: error: {one_line(str(error))}", file=sys.stderr)
        return 2


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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="motab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="distil a student from a teacher (MOTAB or a baseline)",
        description="Distils the student from the teacher on the data set's prompts. "
        "Checkpoints go to train.output_dir; --resume continues from the latest.",
    )
    train.add_argument("--config", help="YAML file (see `motab --help`)")
    _model_arguments(train)
    train.add_argument("--output-dir", help="where checkpoints and metrics.jsonl go")
    train.add_argument("--steps", type=int_at_least(1), help="optimizer steps")
    train.add_argument("--mode", help="motab, on_policy, off_policy, skd or adaswitch")
    _override_argument(train)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument(
        "--overwrite", action="store_true", help="start again in a used output folder (removes the run's checkpoints)"
    )
    train.set_defaults(run=run_train)

    roll = commands.add_parser(
        "rollout",
        help="roll out prompts and save the trajectories",
        description="Writes one JSON line per trajectory; --render draws one as a PNG.",
    )
    roll.add_argument("--config", help="YAML file (see `motab --help`)")
    _model_arguments(roll)
    roll.add_argument("--mode", help="motab, on_policy, off_policy, skd or adaswitch")
    roll.add_argument("--limit", type=int_at_least(1), default=16, help="prompts to roll out (default 16)")
    roll.add_argument("--out", required=True, help="trajectories JSONL")
    roll.add_argument("--batch-size", type=int_at_least(1), default=16, help="rows rolled out together (default 16)")
    roll.add_argument("--render", help="PNG of the first trajectory: scores, boundary, teacher tokens, backtracks")
    _override_argument(roll)
    roll.set_defaults(run=run_rollout)

    demo = commands.add_parser(
        "demo",
        help="MOTAB and its baselines on the toy task, with the shipped teacher (CPU, minutes)",
        description="Distils a small student from the shipped toy teacher with the online methods (off_policy, "
        "on_policy, skd, adaswitch, motab) and the paper's pipeline and its baselines (step_motab, step_skd, "
        "teacher_steps: synthesis, then SFT) at the same budget, evaluates each on the held-out test split and "
        "writes a report.",
    )
    demo.add_argument("--out", default="motab-demo", help="report folder (default motab-demo)")
    demo.add_argument("--seeds", type=int_at_least(1), default=1, help="seeds per method; the table shows mean ± std")
    demo.add_argument("--steps", type=int_at_least(1), help="training steps per method")
    demo.add_argument("--quick", action="store_true", help="a smoke run of about two minutes")
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(run=run_demo)

    synth = commands.add_parser(
        "synthesize",
        help="the paper's data synthesis: step-level rollouts with rewinds, written as SFT records",
        description="Rolls out --responses samples per question step by step (step_motab: the oracle value "
        "against the entropy boundary, a rewind to the TD-error root cause, the teacher's correction; or the "
        "scripts' baselines step_skd and teacher_steps) and writes one JSON record per sample. Resumable "
        "(--resume); under torchrun each rank takes a share and rank 0 merges.",
    )
    _model_arguments(synth)
    synth.add_argument("--out", required=True, help="records JSONL")
    synth.add_argument("--preset", choices=sorted(SYNTHESIS_PRESETS), help="defaults for a setting (toy: the toy task)")
    synth.add_argument("--mode", choices=("step_motab", "step_skd", "teacher_steps"), help="default step_motab")
    synth.add_argument("--responses", type=int_at_least(1), help="samples per question (default 5)")
    synth.add_argument("--prompt-format", choices=("raw", "chat"), help="raw: the bare question (default), chat")
    synth.add_argument("--field-map", type=field_map_flag, default="auto", help=FIELD_MAP_HELP)
    synth.add_argument("--limit", type=int_at_least(1), help="first N questions only")
    synth.add_argument("--stop", help='the step stop string, escapes allowed (default ".\\n\\n")')
    synth.add_argument("--trim-stop", action="store_true", help="cut the stop string off as SGLang does (the scripts)")
    synth.add_argument("--epsilon0", type=number_at_least(0, strictly=True), help="boundary scale ε0 (default 0.2)")
    synth.add_argument("--theta", type=number_at_least(0), help="boundary sharpness θ (default 1.0)")
    synth.add_argument("--top-k", type=int_at_least(1), help="teacher tokens of the boundary's entropy (default 20)")
    synth.add_argument(
        "--static-boundary", action="store_true", help="H = 0: the constant ε0 the scripts computed on SGLang"
    )
    synth.add_argument("--gamma", type=number_at_least(0), help="step_skd's γ (default 0.9)")
    synth.add_argument("--marker", help='text between the student\'s steps and the correction (default "However,")')
    synth.add_argument(
        "--temperature", type=number_at_least(0), help="sampling temperature of both models (default 0.6)"
    )
    synth.add_argument("--max-new-tokens", type=int_at_least(1), help="tokens a trajectory (default 32768)")
    synth.add_argument("--max-step-tokens", type=int_at_least(1), help="tokens a step (default 8192)")
    synth.add_argument("--batch-size", type=int_at_least(1), default=32, help="rows per rollout (default 32)")
    synth.add_argument("--seed", type=int_at_least(0), default=0)
    synth.add_argument("--dtype", help="float32 or bfloat16 (default: bfloat16 on CUDA)")
    synth.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    synth.add_argument("--overwrite", action="store_true", help="start again: remove an existing --out and its parts")
    synth.add_argument("--render", help="PNG of the first record with a breach: V and ε per step, t* marked")
    _override_argument(synth)
    synth.set_defaults(run=run_synthesize)

    sft = commands.add_parser(
        "sft",
        help="supervised fine-tuning on synthesized records (TRL's SFTTrainer)",
        description="Fine-tunes --model on the prompt/completion records (loss on the completion only) with "
        "the reference scripts' defaults: lr 5e-5, 6 epochs, cosine to 1e-6, 5 %% warm-up, weight decay 0.1, "
        "Adam β2 0.95, packing. Checkpoints are HF Trainer's; --resume continues from the latest.",
    )
    sft.add_argument("--model", required=True, help="the student: local folder or cached hub id")
    sft.add_argument("--data", required=True, help="records JSONL (motab synthesize) or any prompt/completion file")
    sft.add_argument("--out", required=True, help="folder for checkpoints and the final model")
    sft.add_argument("--epochs", type=number_at_least(0, strictly=True), help="default 6")
    sft.add_argument("--learning-rate", type=number_at_least(0, strictly=True), help="default 5e-5")
    sft.add_argument("--max-steps", type=int_at_least(1), help="stop after N optimizer steps (overrides --epochs)")
    sft.add_argument("--max-length", type=int_at_least(1), help="tokens per packed row (default 32768)")
    sft.add_argument("--batch-size", type=int_at_least(1), help="rows per device and step (default 1)")
    sft.add_argument("--gradient-accumulation", type=int_at_least(1), help="default 1")
    sft.add_argument("--no-packing", action="store_true", help="one record per row, padded")
    sft.add_argument("--save-steps", type=int_at_least(1), help="checkpoint every N steps (default 500)")
    sft.add_argument("--seed", type=int_at_least(0), help="default 0")
    sft.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    sft.set_defaults(run=run_sft)

    evaluate = commands.add_parser("eval", help="accuracy of a model on a benchmark with \\boxed{} answers")
    evaluate.add_argument("--model", required=True, help="local folder or cached hub id")
    evaluate.add_argument("--data", required=True, help="JSONL / Parquet / datasets folder with answers")
    evaluate.add_argument("--field-map", type=field_map_flag, default="auto", help=FIELD_MAP_HELP)
    evaluate.add_argument(
        "--samples", type=int_at_least(1), default=1, help="samples per problem (pass@1 is their mean)"
    )
    evaluate.add_argument("--temperature", type=number_at_least(0), default=0.0, help="0 is greedy")
    evaluate.add_argument("--max-new-tokens", type=int_at_least(1), default=512)
    evaluate.add_argument("--limit", type=int_at_least(1), help="first N problems only")
    evaluate.add_argument(
        "--answer-format", choices=ANSWER_FORMATS, default="boxed", help="boxed: the last \\boxed{} (default); toy: #d"
    )
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--out", required=True, help="folder for problems.jsonl and summary.json")
    evaluate.set_defaults(run=run_eval)
    return parser


def _override_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override an option")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", help="local folder or cached hub id")
    parser.add_argument("--teacher", help="local folder or cached hub id")
    parser.add_argument("--data", help="JSONL / Parquet / datasets folder")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def load_model(name: str, dtype, device, role: str = "model"):
    """A causal LM and its tokenizer from disk (a folder or a cached hub id): never a download, never
    a hang. What a user can mend (a missing folder, an uncached id, unreadable weights) is a
    ConfigError naming the model's ``role`` (student, teacher) and the file. A local folder's files
    were checked by ``check_sources`` before anything heavy loaded; every command calls it first."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from motab.models import load_tokenizer
    from motab.runs import without_hf_bars

    folder = local_model_folder(name, role)
    try:
        tokenizer = load_tokenizer(name)
        with without_hf_bars():  # transformers' own loading bar would break into the command's bars
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=dtype)
    except SafetensorError as error:  # a cached hub model's weights (a folder's were checked above)
        raise ConfigError(f"the {role}'s weights ({name}) cannot be read: {error}; download them again") from error
    except OSError as error:
        if folder is None:
            raise ConfigError(
                f"the {role} {name!r} is neither a local folder nor in the Hugging Face cache, and nothing is "
                f"downloaded: pass a model folder, or fetch it first with `hf download {name}`"
            ) from error
        raise ConfigError(f"cannot load the {role} from {name}: {str(error).splitlines()[0]}") from error
    return model.to(device), tokenizer


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


def check_model_files(folder: Path, role: str) -> None:
    """Refuses a model folder with a safetensors file whose header or length is broken (truncated,
    or overwritten) or a JSON file (config, tokenizer, generation config) that does not parse,
    naming the file. Reads the safetensors headers only, without torch."""
    from safetensors import SafetensorError, safe_open

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


def check_sources(models: dict[str, str], data: str, field_map: str | FieldMap = "auto") -> None:
    """Refuses, before torch loads, a model (named by role) that is not there or whose weights are
    broken, and a data set that is missing, unreadable or lacks the fields of ``field_map``. The
    records are read once more later, with the tokenizer: cheap beside loading the models."""
    from motab.data import load_records, resolve_field_map

    for role, name in models.items():
        folder = local_model_folder(name, role)
        if folder is not None:
            check_model_files(folder, role)
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


def _raw_config(args) -> dict:
    """The run's configuration: the YAML file, then the flags the command has, then --set."""
    flags = {key: getattr(args, key, None) for key in ("student", "teacher", "data", "device")}
    for option, flag in (("train.output_dir", "output_dir"), ("train.steps", "steps"), ("rollout.mode", "mode")):
        flags[option] = getattr(args, flag, None)
    return resolve_config(args.config, flags, args.set)


def run_train(args) -> int:
    raw = _raw_config(args)
    train, _ = build_configs(raw)
    check_sources({"student": raw["student"], "teacher": raw["teacher"]}, raw["data"], _field_map(raw))
    check_writable(train.output_dir, "train.output_dir", folder=True)
    from motab.runs import check_run_folder  # (no torch)

    check_run_folder(train.output_dir, args.resume, args.overwrite)  # before any model loads
    # torch and transformers load only now: a mistake in the configuration shows in a fraction of a second
    from motab.engine import with_tokenizer_defaults
    from motab.trainer import DistillationTrainer

    rank = _init_distributed(raw)
    student, teacher, tokenizer, problems = _setup(raw, train.rollout)
    train = replace(train, rollout=with_tokenizer_defaults(train.rollout, tokenizer))
    if rank == 0:  # after the tokenizer filled EOS, the vocabulary size and the step delimiters
        print_resolved(raw, train)
    trainer = DistillationTrainer(student, teacher, tokenizer, problems, train)
    try:
        trainer.train(resume=args.resume, overwrite=args.overwrite, progress=rank == 0)
    except KeyboardInterrupt as interrupt:
        # named only once its rename succeeded (a save cut short leaves the previous checkpoint)
        saved = trainer.last_checkpoint
        print(f"interrupted: saved {saved}; continue with --resume" if saved else "interrupted before any save")
        return 128 + interrupting_signal(interrupt)
    print(f"done: {train.output_dir}/checkpoint-{trainer.step}")
    return 0


def interrupting_signal(interrupt: KeyboardInterrupt) -> int:
    """The signal behind ``interrupt``: SIGTERM when the trainer's handler raised it (it names the
    signal), else SIGINT. The exit status is 128 + it, as a shell reports a process the signal ended."""
    import signal

    name = interrupt.args[0] if interrupt.args else ""
    return int(signal.Signals[name]) if name in signal.Signals.__members__ else int(signal.SIGINT)


def run_rollout(args) -> int:
    raw = _raw_config(args)
    _, rollout = build_configs(raw)
    check_sources({"student": raw["student"], "teacher": raw["teacher"]}, raw["data"], _field_map(raw))
    out = Path(args.out)
    check_writable(out, "--out", folder=False)  # before the generation, which the write would otherwise lose
    if args.render:
        check_writable(args.render, "--render", folder=False)
    from motab.engine import rollout_in_batches, with_tokenizer_defaults
    from motab.plots import render_trajectory

    student, teacher, tokenizer, problems = _setup(raw, rollout)
    rollout = with_tokenizer_defaults(rollout, tokenizer)
    print_resolved(raw, rollout)
    prompts = [p.prompt_ids for p in problems[: args.limit]]
    # a bar on stderr when it is a terminal; row i keeps seed i whatever the batches
    trajectories = rollout_in_batches(
        student, teacher, prompts, rollout, batch_size=args.batch_size, tokenizer=tokenizer
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for trajectory in trajectories:
            record = trajectory.to_dict() | {"text": tokenizer.decode(trajectory.tokens)}
            f.write(json.dumps(record) + "\n")
    print(f"wrote {len(trajectories)} trajectories to {out}")
    if args.render:
        render_trajectory(trajectories[0], args.render)
        print(f"rendered the first one to {args.render}")
    return 0


def run_eval(args) -> int:
    if args.device is not None:
        check_device(args.device, "--device")
    check_sources({"model": args.model}, args.data, args.field_map)
    check_writable(args.out, "--out", folder=True)  # before the generation, which the write would otherwise lose
    from motab.config import SamplingConfig
    from motab.evaluate import evaluate

    device, dtype = _device_and_dtype(args.device, None)
    model, tokenizer = load_model(args.model, dtype, device)
    problems, _ = _load_problems(args.data, tokenizer, field_map=args.field_map, limit=args.limit)
    if any(p.answer is None for p in problems):
        raise ConfigError(f"{args.data} has no answer field: eval needs reference answers")
    result = evaluate(
        model,
        tokenizer,
        [p.prompt_ids for p in problems],
        [p.answer for p in problems],
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(temperature=args.temperature),
        out_dir=args.out,
        answer_format=args.answer_format,
        progress=None,  # a bar on stderr when it is a terminal
    )
    print(f"accuracy (pass@1 over {args.samples} sample(s)): {result.accuracy:.4f} on {len(problems)} problems")
    return 0


def run_synthesize(args) -> int:
    preset = SYNTHESIS_PRESETS[args.preset or "paper"]

    def chosen(flag: str, key: str | None = None):
        value = getattr(args, flag)
        return preset.get(key or flag) if value is None else value

    temperature = chosen("temperature")
    rollout = dict(
        mode=args.mode or "step_motab",
        step_stop=_unescaped(args.stop, "--stop") if args.stop else preset["stop"],
        trim_stop=args.trim_stop,
        max_new_tokens=chosen("max_new_tokens"),
        max_step_tokens=chosen("max_step_tokens"),
        min_correction_tokens=preset["min_correction_tokens"],
    )
    if args.gamma is not None:
        rollout["step_skd_gamma"] = args.gamma
    monitor = {
        key: getattr(args, flag)
        for key, flag in (("epsilon0", "epsilon0"), ("theta", "theta"), ("entropy_top_k", "top_k"))
    }
    monitor = {key: value for key, value in monitor.items() if value is not None}
    if args.static_boundary:
        monitor["adaptive_boundary"] = False
    raw = {
        "rollout": rollout,
        "monitor": monitor,
        "student_sampling": {"temperature": temperature},
        "teacher_sampling": {"temperature": temperature},
    }
    apply_overrides(raw, args.set)
    _, config = build_configs(raw)
    needed = ("teacher", "data") if config.mode == "teacher_steps" else ("student", "teacher", "data")
    for name in needed:
        if not getattr(args, name):
            raise ConfigError(f"--{name} is required for mode {config.mode}")
    check_sources({role: getattr(args, role) for role in needed if role != "data"}, args.data, args.field_map)
    if args.device is not None:
        check_device(args.device, "--device")
    if args.dtype is not None:
        check_dtype(args.dtype, "--dtype")
    out = Path(args.out)
    check_writable(out, "--out", folder=False)
    if args.render:
        check_writable(args.render, "--render", folder=False)
    # torch and transformers load only now: a mistake in the options shows in a fraction of a second
    from motab.synthesis import SynthesisOptions, check_output, load_questions, synthesize

    check_output(out, args.resume, args.overwrite)  # before any model loads

    try:
        options = SynthesisOptions(
            responses=5 if args.responses is None else args.responses,
            prompt_format=args.prompt_format or "raw",
            marker=chosen("marker"),
            seed=args.seed,
            batch_size=args.batch_size,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        questions = load_questions(args.data, args.field_map, args.limit)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    raw_device = {"device": args.device} if args.device else {}
    rank = _init_distributed(raw_device)
    world = _world_size()
    device, dtype = _device_and_dtype(raw_device.get("device", args.device), args.dtype)
    _check_graphs_device(config.cuda_graphs, device)
    teacher, tokenizer = load_model(args.teacher, dtype, device, "teacher")
    student = None
    if config.mode != "teacher_steps":
        student, student_tokenizer = load_model(args.student, dtype, device, "student")
        _check_tokenizers(student_tokenizer, tokenizer)
        tokenizer = student_tokenizer
    barrier = _barrier() if world > 1 else None
    summary = synthesize(
        student, teacher, tokenizer, questions, out, config, options,
        resume=args.resume, overwrite=args.overwrite, rank=rank, world_size=world, barrier=barrier,
        progress=rank == 0,
    )  # fmt: skip
    if rank == 0:
        rate = summary.breaches / max(summary.records, 1)
        print(
            f"wrote {out}: {summary.records} new records ({summary.skipped} already there), breach rate {rate:.1%}, "
            f"{summary.tokens / max(summary.seconds, 1e-9):.0f} tokens/s"
        )
        if args.render:
            from motab.plots import render_steps

            records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
            chosen_record = next((r for r in records if r["breach"]), records[0])
            render_steps(chosen_record, args.render)
            print(f"rendered record {chosen_record['id']}/{chosen_record['response_index']} to {args.render}")
    return 0


def _unescaped(text: str, flag: str) -> str:
    """``text`` with its backslash escapes (``\\n``) read, as a flag writes a stop string."""
    import codecs

    try:
        return codecs.decode(text, "unicode_escape")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{flag} {text!r}: {error.reason}") from error


def run_sft(args) -> int:
    folder = local_model_folder(args.model, "model")
    if folder is None:  # a hub id: SFTTrainer is given a folder, never a download
        raise ConfigError(
            f"the model {args.model!r} is not a local folder: sft fine-tunes a saved model folder "
            f"(`hf download {args.model} --local-dir DIR` makes one)"
        )
    check_model_files(folder, "model")
    check_writable(args.out, "--out", folder=True)
    from motab.sft import SFTOptions, resume_point, run_sft, to_dataset

    given = dict(
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        max_length=args.max_length,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation,
        save_steps=args.save_steps,
        seed=args.seed,
    )
    try:
        options = SFTOptions(**{k: v for k, v in given.items() if v is not None}, packing=not args.no_packing)
        resume_point(args.out, args.resume)  # a used folder or nothing to resume: said before anything loads
        to_dataset(args.data)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    result = run_sft(args.model, args.data, args.out, options, resume=args.resume)
    print(f"done: {result.global_step} steps, training loss {result.training_loss:.4f}; model saved in {args.out}")
    return 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier():
    import torch.distributed as dist

    return dist.barrier


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


def run_demo(args) -> int:
    _device_and_dtype(args.device, None)  # a device that is not there is refused before anything trains
    from motab.demo import run_demo as demo

    demo(args.out, seeds=args.seeds, steps=args.steps, quick=args.quick, device=args.device)
    print(f"report: {args.out}/results.json, accuracy.png, rollout.png")
    return 0


def print_resolved(raw: dict, config) -> None:
    """Prints the run's configuration as it runs: the top-level keys and the ``TrainConfig`` (or the
    ``RolloutConfig``) with what the tokenizer filled in. Lists of ids on one line each."""
    dumped = yaml.dump(_printable(raw, config), Dumper=_ConfigDumper, sort_keys=False, width=120)
    print("resolved config:\n" + dumped)


class _ConfigDumper(yaml.SafeDumper):
    """YAML as a config is written: lists (of ids) on one line, texts with line breaks in escapes."""


_ConfigDumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True))
_ConfigDumper.add_representer(
    str,
    lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"' if "\n" in data else None),
)


def _printable(raw: dict, config) -> dict:
    shown = {k: v for k, v in raw.items() if k in TOP_LEVEL}
    values = asdict(config)
    if "rollout" in values:  # a TrainConfig
        shown["train"] = {k: v for k, v in values.items() if k != "rollout"}
        values = values["rollout"]
    shown["rollout"] = values
    return json.loads(json.dumps(shown, default=str))


if __name__ == "__main__":
    sys.exit(main())
