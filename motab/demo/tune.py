"""Tunes the demo's methods on the validation split, with the same budget for every method.

    python -m motab.demo.tune --out motab/toy/assets/tuning.json

Every setting of ``motab.demo.TUNING_GRID`` (the same number of distinct settings per method: two
settings that train identical weights are refused) distils a copy of the same warm-started student
(seed ``--seed``) at the demo's budget and is judged by its greedy accuracy on the validation
split; the test split is never read. The record (command, machine, every run, the chosen setting
per method) ships as ``motab/toy/assets/tuning.json``, and ``motab demo`` runs each method with
the setting it chose.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import torch

from motab.demo.run import FULL, STUDENT_SHAPE, TUNING_GRID, as_problems, method_config, run_method, warm_student
from motab.demo.toy_models import greedy_accuracy, toy_model
from motab.toy.task import generate_split
from motab.toy.teacher import load_teacher


def _run_setting(warm_state: str, method: str, options: dict, size, seed: int, threads: int) -> dict:
    """One setting from the saved warm start (a worker process's whole job)."""
    torch.set_num_threads(threads)
    teacher, tokenizer = load_teacher()
    student = toy_model(tokenizer, STUDENT_SHAPE, seed)
    student.load_state_dict(torch.load(warm_state))
    train = as_problems(tokenizer, generate_split("train", 5000))
    validation = generate_split("validation", size.validation)
    with tempfile.TemporaryDirectory() as folder:
        config = method_config(tokenizer, method, options, size, folder, seed)
        run = run_method(student, teacher, tokenizer, train, validation, config, progress=False)
    return dict(run, options=options)


def tune(grid: dict[str, list[dict]], size, seed: int = 0, jobs: int = 1) -> dict:
    """Runs every setting of ``grid``; returns the record with the best setting per method."""
    counts = {method: len(settings) for method, settings in grid.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"every method needs the same tuning budget; settings per method: {counts}")
    started = time.time()
    teacher, tokenizer = load_teacher()
    student = warm_student(tokenizer, seed, size)
    warm_accuracy = greedy_accuracy(student, tokenizer, generate_split("validation", size.validation))
    settings = [(method, options) for method, grid_of in grid.items() for options in grid_of]
    threads = max(torch.get_num_threads() // jobs, 1)
    with tempfile.TemporaryDirectory() as folder:
        warm_state = str(Path(folder) / "warm.pt")
        torch.save(student.state_dict(), warm_state)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_run_setting, warm_state, m, o, size, seed, threads) for m, o in settings]
            runs = []
            for (method, options), future in zip(settings, futures):
                runs.append(future.result())
                print(
                    f"{method:>10} {json.dumps(options)}: validation {100 * runs[-1]['validation_accuracy']:.1f}%",
                    flush=True,
                )
    check_distinct(runs)
    chosen = {}
    for method in grid:
        mine = [r for r in runs if r["method"] == method]
        chosen[method] = max(mine, key=lambda r: r["validation_accuracy"])["options"]  # first best on ties
    return dict(
        seed=seed,
        size=size.__dict__,
        warm_validation_accuracy=warm_accuracy,
        runs=runs,
        chosen=chosen,
        seconds=round(time.time() - started),
        date=str(date.today()),
        machine=f"{platform.machine()} CPU, torch {torch.__version__}, {jobs} job(s)",
    )


def check_distinct(runs: list[dict]) -> None:
    """Refuses a grid in which two settings of one method trained the same weights: identical runs
    are one setting, and every method must get the same number of distinct ones."""
    for method in {r["method"] for r in runs}:
        options_by_weights = {}
        for run in (r for r in runs if r["method"] == method):
            twin = options_by_weights.get(run["weights_digest"])
            if twin is not None:
                raise ValueError(
                    f"{method}: settings {twin} and {run['options']} trained identical weights; they count as one "
                    "setting: change the grid so that every method has the same number of distinct settings"
                )
            options_by_weights[run["weights_digest"]] = run["options"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tuning.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="settings run at once, each in its own process")
    parser.add_argument(
        "--methods", nargs="+", choices=sorted(TUNING_GRID), help="tune these methods only and merge them into --out"
    )
    args = parser.parse_args(argv)
    command = "python -m motab.demo.tune " + " ".join(argv if argv is not None else sys.argv[1:])
    grid = TUNING_GRID if not args.methods else {m: TUNING_GRID[m] for m in args.methods}
    record = tune(grid, FULL, args.seed, args.jobs)
    record["command"] = command
    if args.methods:
        record = merge(json.loads(Path(args.out).read_text()), record)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record["chosen"], indent=1))


def merge(record: dict, addition: dict) -> dict:
    """``record`` with the methods tuned in ``addition`` (same seed and budget: the same warm start)
    replacing or joining its own; the addition's command, date and time are kept beside the record's."""
    if (addition["seed"], addition["size"]) != (record["seed"], record["size"]):
        raise ValueError("a merged tuning must use the record's seed and budget (the same warm start)")
    methods = set(addition["chosen"])
    merged = dict(record)
    merged["runs"] = [r for r in record["runs"] if r["method"] not in methods] + addition["runs"]
    merged["chosen"] = {**{m: o for m, o in record["chosen"].items() if m not in methods}, **addition["chosen"]}
    note = {k: addition[k] for k in ("seconds", "date", "machine", "command")}
    merged["additions"] = record.get("additions", []) + [dict(note, methods=sorted(methods))]
    return merged


if __name__ == "__main__":
    main()
