"""A folder for the paper's pipeline on the toy task, run from the command line as a user would on
real models: ``motab prepare toy/`` writes

- ``train.jsonl``, ``validation.jsonl``, ``test.jsonl``: toy problems of the disjoint splits, as
  LIMO-style records (``question``, ``solution``, ``answer``);
- ``teacher/``: a copy of the shipped toy teacher (model and tokenizer);
- ``student/``: the demo's warm-started student (the same warm start as ``motab demo``'s seed;
  ``--warm-steps`` shortens it).

Then ``motab synthesize --preset toy``, ``motab sft`` and ``motab eval --preset toy`` run on those
folders (see the README).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from motab.config import ConfigError
from motab.demo.run import FULL, warm_student
from motab.runs import without_hf_bars
from motab.toy.task import generate_split
from motab.toy.teacher import load_teacher, teacher_path


def write_problems(path: Path, split: str, count: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for problem in generate_split(split, count):
            record = dict(question=problem.prompt, solution=problem.solution, answer=problem.answer)
            f.write(json.dumps(record) + "\n")


# What prepare writes into its folder: what makes it used, and all --overwrite replaces.
PREPARED = ("train.jsonl", "validation.jsonl", "test.jsonl", "teacher", "student")


def check_prepare_folder(out: str | Path, overwrite: bool) -> None:
    """Refuses a folder that holds what prepare writes, unless ``overwrite``; reads only."""
    held = [name for name in PREPARED if (Path(out) / name).exists()]
    if held and not overwrite:
        raise ConfigError(
            f"{out} already holds {', '.join(held)}: pass --overwrite to replace them, or choose another folder"
        )


def prepare(
    out: str | Path,
    *,
    train: int = 2000,
    validation: int = 300,
    test: int = 500,
    seed: int = 0,
    warm_steps: int = FULL.warm_steps,
    overwrite: bool = False,
    log=None,
) -> Path:
    """Writes the folder (see the module docstring). Everything is made in a temporary folder beside
    ``out`` and moved in at the end, so an error or an interrupt leaves ``out`` as it was; a folder
    that holds what prepare writes is refused unless ``overwrite`` (which replaces those, nothing
    else). ``log`` hears of the warm start's loss as it trains (0 steps: an untrained student)."""
    out = Path(out)
    check_prepare_folder(out, overwrite)
    work = out.with_name(f".{out.name}.prepare.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        for split, count in (("train", train), ("validation", validation), ("test", test)):
            write_problems(work / f"{split}.jsonl", split, count)
        shutil.copytree(teacher_path(), work / "teacher")
        with without_hf_bars():
            _, tokenizer = load_teacher()
        student = warm_student(tokenizer, seed, replace(FULL, warm_steps=warm_steps), log=log)
        with without_hf_bars():
            student.save_pretrained(work / "student")
        tokenizer.save_pretrained(work / "student")
        out.mkdir(parents=True, exist_ok=True)
        for name in PREPARED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(work / name, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
