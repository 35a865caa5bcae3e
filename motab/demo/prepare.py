"""A folder for the paper's pipeline on the toy task, run from the command line as a user would on
real models: ``python -m motab.demo.prepare toy/`` writes

- ``train.jsonl``, ``validation.jsonl``, ``test.jsonl``: toy problems of the disjoint splits, as
  LIMO-style records (``question``, ``solution``, ``answer``);
- ``teacher/``: a copy of the shipped toy teacher (model and tokenizer);
- ``student/``: the demo's warm-started student (the same warm start as ``motab demo``'s seed;
  ``--warm-steps`` shortens it).

Then ``motab synthesize --preset toy``, ``motab sft`` and ``motab eval --answer-format toy`` run
on those folders (see the README).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from motab.demo.run import FULL, warm_student
from motab.toy.task import generate_split
from motab.toy.teacher import load_teacher, teacher_path


def write_problems(path: Path, split: str, count: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for problem in generate_split(split, count):
            record = dict(question=problem.prompt, solution=problem.solution, answer=problem.answer)
            f.write(json.dumps(record) + "\n")


def prepare(
    out: str | Path,
    *,
    train: int = 2000,
    validation: int = 300,
    test: int = 500,
    seed: int = 0,
    warm_steps: int = FULL.warm_steps,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("validation", validation), ("test", test)):
        write_problems(out / f"{split}.jsonl", split, count)
    shutil.copytree(teacher_path(), out / "teacher", dirs_exist_ok=True)
    _, tokenizer = load_teacher()
    student = warm_student(tokenizer, seed, replace(FULL, warm_steps=warm_steps))
    student.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--train", type=int, default=2000, help="train problems (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="the warm start's seed (default 0)")
    # fewer steps make a weaker student in less time (0: an untrained one, for a walkthrough in seconds)
    parser.add_argument(
        "--warm-steps", type=int, default=FULL.warm_steps, help=f"the warm start's steps (default {FULL.warm_steps})"
    )
    args = parser.parse_args(argv)
    prepare(args.out, train=args.train, seed=args.seed, warm_steps=args.warm_steps)
    print(f"wrote {args.out}: train/validation/test.jsonl, teacher/, student/")


if __name__ == "__main__":
    main()
