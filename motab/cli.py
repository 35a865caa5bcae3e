"""The ``motab`` command: ``train``, ``rollout`` and ``eval``.

    motab train --config run.yaml                 # distil (MOTAB or a baseline); resumable
    motab rollout --student S --teacher T --data problems.jsonl --out trajectories.jsonl --render rollout.png
    motab eval --model M --data test.jsonl --out eval/
    motab demo                                    # the toy task, on a CPU, in minutes

Models and tokenizers load from a local folder or a Hugging Face hub id that is already in the
local cache: nothing is downloaded (``huggingface-cli download ID`` fetches one first). A YAML
config has top-level ``student``, ``teacher``, ``data`` (and optionally ``field_map``,
``max_prompt_tokens``, ``device``, ``dtype``) plus sections ``train`` (TrainConfig), ``rollout``
(RolloutConfig), ``monitor`` (MonitorConfig), ``student_sampling`` and ``teacher_sampling`` (all
in ``motab.config``); ``--set section.key=value`` overrides any of them. The resolved configuration
is printed first.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from motab.config import TOP_LEVEL, ConfigError, build_configs, resolve_config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"motab {args.command}: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="motab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    train.add_argument("--steps", type=int, help="optimizer steps")
    train.add_argument("--mode", help="motab, on_policy, off_policy, skd or adaswitch")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override an option")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.set_defaults(run=run_train)

    roll = commands.add_parser(
        "rollout",
        help="roll out prompts and save the trajectories",
        description="Writes one JSON line per trajectory; --render draws one as a PNG.",
    )
    roll.add_argument("--config", help="YAML file (see `motab --help`)")
    _model_arguments(roll)
    roll.add_argument("--mode", help="motab, on_policy, off_policy, skd or adaswitch")
    roll.add_argument("--limit", type=int, default=16, help="prompts to roll out (default 16)")
    roll.add_argument("--out", required=True, help="trajectories JSONL")
    roll.add_argument("--render", help="PNG of the first trajectory: scores, boundary, teacher tokens, backtracks")
    roll.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override an option")
    roll.set_defaults(run=run_rollout)

    demo = commands.add_parser(
        "demo",
        help="MOTAB and its baselines on the toy task, with the shipped teacher (CPU, minutes)",
        description="Distils a small student from the shipped toy teacher with off_policy, on_policy, skd, "
        "adaswitch and motab at the same budget, evaluates each on the held-out test split and writes a report.",
    )
    demo.add_argument("--out", default="motab-demo", help="report folder (default motab-demo)")
    demo.add_argument("--seeds", type=int, default=1, help="seeds per method; the table shows mean ± std")
    demo.add_argument("--steps", type=int, help="training steps per method")
    demo.add_argument("--quick", action="store_true", help="a smoke run of about two minutes")
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(run=run_demo)

    evaluate = commands.add_parser("eval", help="accuracy of a model on a benchmark with \\boxed{} answers")
    evaluate.add_argument("--model", required=True, help="local folder or cached hub id")
    evaluate.add_argument("--data", required=True, help="JSONL / Parquet / datasets folder with answers")
    evaluate.add_argument("--field-map", default="auto", help="auto, limo or acereason")
    evaluate.add_argument("--samples", type=int, default=1, help="samples per problem (pass@1 is their mean)")
    evaluate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    evaluate.add_argument("--max-new-tokens", type=int, default=512)
    evaluate.add_argument("--limit", type=int, help="first N problems only")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--out", required=True, help="folder for problems.jsonl and summary.json")
    evaluate.set_defaults(run=run_eval)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", help="local folder or cached hub id")
    parser.add_argument("--teacher", help="local folder or cached hub id")
    parser.add_argument("--data", help="JSONL / Parquet / datasets folder")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def load_model(name: str, dtype, device):
    """A causal LM from disk (a folder or a cached hub id): never a download, never a hang."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=dtype)
        tokenizer = _generic_tokenizer(name) or AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError as error:
        raise ConfigError(
            f"cannot load {name!r} from disk ({str(error).splitlines()[0]}). Pass a local folder, or download the "
            f"weights first: huggingface-cli download {name}"
        ) from error
    return model.to(device), tokenizer


def _generic_tokenizer(folder: str):
    """A tokenizer saved as a plain ``tokenizers`` one (as motab's own toy tokenizer is), loaded as
    such: AutoTokenizer would pick the model family's tokenizer class from config.json instead."""
    from transformers import PreTrainedTokenizerFast

    config = Path(folder) / "tokenizer_config.json"
    if not config.exists():
        return None
    declared = json.loads(config.read_text()).get("tokenizer_class")
    if declared not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return None
    return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)


def _setup(raw):
    import torch

    from motab.data import load_problems
    from motab.engine import check_same_tokenizer

    device = torch.device(raw.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, raw.get("dtype") or ("bfloat16" if device.type == "cuda" else "float32"))
    student, tokenizer = load_model(raw["student"], dtype, device)
    teacher, teacher_tokenizer = load_model(raw["teacher"], dtype, device)
    try:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    try:
        problems, skipped = load_problems(
            raw["data"],
            tokenizer,
            field_map=raw.get("field_map", "auto"),
            max_prompt_tokens=raw.get("max_prompt_tokens"),
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error
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
    from motab.engine import with_tokenizer_defaults
    from motab.trainer import DistillationTrainer

    raw = _raw_config(args)
    train, rollout = build_configs(raw)
    rank = _init_distributed(raw)
    if rank == 0:
        print("resolved config:\n" + yaml.safe_dump(_printable(raw, train), sort_keys=False))
    student, teacher, tokenizer, problems = _setup(raw)
    train = replace(train, rollout=with_tokenizer_defaults(train.rollout, tokenizer))
    trainer = DistillationTrainer(student, teacher, tokenizer, problems, train)
    try:
        trainer.train(resume=args.resume, progress=rank == 0)
    except KeyboardInterrupt:
        print(f"interrupted: saved {train.output_dir}/checkpoint-{trainer.step}; continue with --resume")
        return 130
    print(f"done: {train.output_dir}/checkpoint-{trainer.step}")
    return 0


def run_rollout(args) -> int:
    from motab.engine import rollout as run
    from motab.engine import with_tokenizer_defaults
    from motab.plots import render_trajectory

    raw = _raw_config(args)
    _, rollout = build_configs(raw)
    student, teacher, tokenizer, problems = _setup(raw)
    rollout = with_tokenizer_defaults(rollout, tokenizer)
    prompts = [p.prompt_ids for p in problems[: args.limit]]
    trajectories = run(student, teacher, prompts, rollout, tokenizer=tokenizer)
    out = Path(args.out)
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
    import torch

    from motab.config import SamplingConfig
    from motab.data import load_problems
    from motab.evaluate import evaluate

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model(args.model, dtype, device)
    try:
        problems, _ = load_problems(args.data, tokenizer, field_map=args.field_map, limit=args.limit)
    except ValueError as error:
        raise ConfigError(str(error)) from error
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
    )
    print(f"accuracy (pass@1 over {args.samples} sample(s)): {result.accuracy:.4f} on {len(problems)} problems")
    return 0


def run_demo(args) -> int:
    from motab.demo import run_demo as demo

    if args.seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {args.seeds}")
    demo(args.out, seeds=args.seeds, steps=args.steps, quick=args.quick, device=args.device)
    print(f"report: {args.out}/results.json, accuracy.png, rollout.png")
    return 0


def _printable(raw: dict, train) -> dict:
    shown = {k: v for k, v in raw.items() if k in TOP_LEVEL}
    values = asdict(train)
    shown["train"] = {k: v for k, v in values.items() if k != "rollout"}
    shown["rollout"] = values["rollout"]
    return json.loads(json.dumps(shown, default=str))


if __name__ == "__main__":
    sys.exit(main())
