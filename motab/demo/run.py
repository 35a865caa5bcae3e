"""``motab demo``: MOTAB and its baselines on the toy task, with the shipped teacher, on a CPU.

One smaller student (same tokenizer, fewer and narrower layers) gets a brief supervised warm
start on a slice of the train split, so that its own samples mean something; then each method
(``off_policy``, ``on_policy``, ``skd``, ``adaswitch``, ``motab``) distils a copy of that same
student from the teacher for the same number of steps and prompts, with its own best setting from
the shipped tuning record (``motab.demo.tune``: validation split only, the same budget for every
method), and is evaluated (greedy, the paged engine) on the validation split during training and
on the test split at the end. The report folder gets ``results.json``, ``accuracy.png``
(validation accuracy against the training step, per method), ``rollout.png`` (one MOTAB rollout:
scores, boundary, backtracks, teacher tokens) and two measurements on the warm-started student:
teacher decay (the teacher's accuracy when it continues from the student's first L tokens) and
teacher guidance (once the student has written a wrong value, does the teacher follow the
student's context, the problem, or neither — the last is the reversed exposure bias MOTAB cuts).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import date
from importlib import resources
from pathlib import Path

import torch
import transformers

from motab.config import ConfigError, RolloutConfig, TrainConfig, build_configs, set_option
from motab.data import Problem
from motab.demo.measures import teacher_decay, teacher_guidance
from motab.demo.toy_models import MAX_SOLUTION_TOKENS, greedy_accuracy, greedy_solutions, supervised_train, toy_model
from motab.engine import rollout
from motab.plots import plot_accuracy_curves, render_trajectory
from motab.policy import resolve_training
from motab.runs import (
    append_line,
    count_lines,
    drop_cut_line,
    json_lines,
    refuse_other_settings,
    without_hf_bars,
    write_atomically,
)
from motab.sft import SFTOptions, run_sft
from motab.synthesis import Question, SynthesisOptions, synthesize
from motab.toy.task import PAPER_PRESET, generate_split, is_correct, last_answer
from motab.toy.teacher import load_teacher
from motab.trainer import DistillationTrainer

ONLINE_METHODS = ("off_policy", "on_policy", "skd", "adaswitch", "motab")
# The paper's pipeline and the reference scripts' two baselines: records synthesized from the warm
# student and the teacher (``motab.synthesis``), then SFT of the student on them (``motab.sft``).
PAPER_METHODS = ("teacher_steps", "step_skd", "step_motab")
METHODS = ONLINE_METHODS + PAPER_METHODS
RESPONSES = 5  # records per question, as the scripts
# The two budgets of the final tables: equal steps × prompts, and equal wall clock — the training
# time the on-policy (GKD) baseline needs for those steps, in the same seed.
BUDGETS = ("steps", "time")
CLOCK_METHOD = "on_policy"
# The steps of an equal-wall-clock run come from the method's own measured pace; if the run then
# trains more than this far from the clock, the load on the machine changed and the report says so.
CLOCK_TOLERANCE = 0.25
STUDENT_SHAPE = dict(hidden=64, intermediate=192, layers=2, heads=4, kv_heads=2)  # motab.tiny.tiny_config's


@dataclass(frozen=True)
class DemoSize:
    steps: int
    prompts_per_step: int
    warm_steps: int
    warm_problems: int
    validation: int
    test: int
    decay_problems: int


# One seed takes 12–19 minutes on a 2-core CPU, by the machine (8 methods at two budgets; about 6 when the demo
# ran 5 methods at one budget, within the 10 minutes it was then allowed). The warm start
# (1500 steps on a 2000-problem slice) brings the student to 30–45 % so that its own samples mean
# something (after 300 steps, at ≈ 20 %, it sat on the flat start of its learning curve and no
# method moved it); 200 steps of distillation per method is what the remaining minutes buy.
FULL = DemoSize(
    steps=200, prompts_per_step=32, warm_steps=1500, warm_problems=2000, validation=300, test=500, decay_problems=100
)
QUICK = DemoSize(
    steps=3, prompts_per_step=8, warm_steps=20, warm_problems=100, validation=16, test=32, decay_problems=16
)
WARM_LEARNING_RATE = 3e-3

# What every method shares, as sections of ``motab train``'s configuration; only the rollout mode
# and each method's tuned options (``tuned_options``) differ.
SHARED_OPTIONS = {
    "train": dict(learning_rate=1e-3, warmup_steps=2, loss_kind="fkl"),
    "rollout": dict(
        max_new_tokens=MAX_SOLUTION_TOKENS,
        draft_len=4,
        backtrack="step",
        intervention="step",
        intervention_len=24,
        max_interventions=4,
    ),
    "monitor": dict(score="fkl", rule="window", window=16, window_factor=3.0, tau_min=0.3, warmup=4),
    "student_sampling": dict(temperature=1.0),
    "teacher_sampling": dict(temperature=0.0),
}
# What the paper's methods share instead, from the toy preset of ``motab synthesize``: the step stop
# (a blank line), the step and correction budgets, and the scripts' sampling temperature for both.
PAPER_OPTIONS = {
    "rollout": dict(
        step_stop=PAPER_PRESET["stop"],
        max_step_tokens=PAPER_PRESET["max_step_tokens"],
        min_correction_tokens=PAPER_PRESET["min_correction_tokens"],
    ),
    "student_sampling": dict(temperature=PAPER_PRESET["temperature"]),
    "teacher_sampling": dict(temperature=PAPER_PRESET["temperature"]),
}

# The tuning grid (``python -m motab.demo.tune``, reports/demo/PROTOCOL.md): the same number of
# distinct settings for every method — the learning rate and one option that is the method's own —
# tried from the same warm start and judged on the validation split only. The off_policy teacher's
# temperatures are spread (0 / 1 / 2): the teacher is so sure of itself that 0.7 sampled exactly
# what greedy decoding writes, and identical runs do not count. For the two monitored methods the
# option is the boundary: K barely matters here (a grid over K = 3, 2, 1.5 gave the same
# decisions: the students' windowed mean divergence is so small that the τ_min floor is the
# boundary), so the grid varies the floor and the score — fkl measures the student's uncertainty
# whatever it wrote, the teacher's surprise (teacher_nll) what it wrote.
BOUNDARIES = (
    {"monitor.score": "fkl", "monitor.tau_min": 0.3},
    {"monitor.score": "fkl", "monitor.tau_min": 1.0},
    {"monitor.score": "teacher_nll", "monitor.tau_min": 2.0},
)
TUNING_GRID = {
    "off_policy": [
        {"train.learning_rate": lr, "teacher_sampling.temperature": t} for lr in (1e-3, 3e-3) for t in (0.0, 1.0, 2.0)
    ],
    "on_policy": [
        {"train.learning_rate": lr, "student_sampling.temperature": t} for lr in (1e-3, 3e-3) for t in (1.0, 0.7, 0.5)
    ],
    "skd": [{"train.learning_rate": lr, "monitor.skd_top_k": k} for lr in (1e-3, 3e-3) for k in (25, 10, 5)],
    "adaswitch": [{"train.learning_rate": lr, **boundary} for lr in (1e-3, 3e-3) for boundary in BOUNDARIES],
    "motab": [{"train.learning_rate": lr, **boundary} for lr in (1e-3, 3e-3) for boundary in BOUNDARIES],
    # The paper's methods: the SFT learning rate × one option of the synthesis, each value giving
    # other records (checked on 300 questions): the teacher's temperature (0.6, the scripts', writes
    # what greedy decoding writes on this task); step_skd's γ; step_motab's ε0 (the toy teacher's
    # top-20 entropy is ~0.001 nats, so ε ≈ ε0; the steps' values lie above 0.99 or below 0.5, so
    # ε0 0.5, 0.9 and 0.99 make the same decisions).
    "teacher_steps": [
        {"train.learning_rate": lr, "teacher_sampling.temperature": t} for lr in (1e-3, 3e-3) for t in (0.6, 1.0, 2.0)
    ],
    "step_skd": [
        {"train.learning_rate": lr, "rollout.step_skd_gamma": g} for lr in (1e-3, 3e-3) for g in (0.9, 0.7, 0.5)
    ],
    "step_motab": [{"train.learning_rate": lr, "monitor.epsilon0": e} for lr in (1e-3, 3e-3) for e in (0.2, 0.5, 0.05)],
}


def tuning_record_path() -> Path:
    return Path(str(resources.files("motab.toy") / "assets" / "tuning.json"))


def tuned_options() -> dict[str, dict]:
    """Each method's best validation setting in the shipped tuning record (seed 0): what the demo runs."""
    path = tuning_record_path()
    if not path.exists():
        raise FileNotFoundError(f"the demo's tuning record is missing from {path}: run python -m motab.demo.tune")
    return json.loads(path.read_text())["chosen"]


def as_problems(tokenizer, toy_problems) -> list[Problem]:
    """The pipeline's problems (prompt tokenised) of the toy task's problems."""
    return [Problem(p.prompt, tokenizer(p.prompt)["input_ids"], p.answer, p.solution) for p in toy_problems]


def method_config(
    tokenizer, method: str, options: dict, size: DemoSize, output_dir: str | Path, seed: int
) -> TrainConfig:
    """A method's training configuration: SHARED_OPTIONS, then ``options`` ("section.key": value, as
    ``motab train --set`` takes them), at the demo's budget."""
    raw = {section: dict(values) for section, values in SHARED_OPTIONS.items()}
    if method in PAPER_METHODS:
        for section, values in PAPER_OPTIONS.items():
            raw[section].update(values)
    raw["rollout"]["mode"] = method
    raw["train"].update(
        output_dir=str(output_dir),
        steps=size.steps,
        prompts_per_step=size.prompts_per_step,
        micro_batch=size.prompts_per_step,
        save_every=10**9,
        seed=seed,
    )
    for key, value in options.items():
        set_option(raw, key, value)
    train, rollout = build_configs(raw)
    return resolve_training(replace(train, rollout=rollout), tokenizer)


def warm_student(tokenizer, seed: int, size: DemoSize, device: str = "cpu", log=None):
    """The student every method starts from: supervised on a slice of the train split (``log``
    hears of its loss as it trains)."""
    student = toy_model(tokenizer, STUDENT_SHAPE, seed).to(device)
    warm = generate_split("train", size.warm_problems)
    supervised_train(
        student, tokenizer, warm, steps=size.warm_steps, batch_size=32, lr=WARM_LEARNING_RATE, seed=seed,
        device=device, log=log,
    )  # fmt: skip
    return student


# What a demo writes into its folder (its report, and the finished runs an interrupted one keeps in
# .parts): what --overwrite removes, with the runs' own folders (seed*-*), and nothing else.
REPORT_FILES = ("results.json", "accuracy.png", "rollout.png")
PARTS = ".parts"


def check_demo_folder(out: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuses a folder that holds a demo (its report, or an interrupted one's finished runs)
    without ``resume`` or ``overwrite``, both at once, and a resume with nothing to resume."""
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the demo or start it again")
    if resume and not (out / PARTS / "settings.json").exists():
        done = " (it is complete: --overwrite runs it again)" if (out / "results.json").exists() else ""
        raise ConfigError(f"nothing to resume in {out}: no finished runs of an interrupted demo{done}")
    if not (resume or overwrite) and ((out / "results.json").exists() or (out / PARTS).exists()):
        raise ConfigError(
            f"{out} holds a demo (results.json or an interrupted one's runs): pass --resume to continue it or "
            "--overwrite to run it again there, or choose another --out"
        )


def kept_runs(out: str | Path) -> int:
    """The runs an interrupted demo kept (``motab demo --resume`` does not train them again)."""
    return count_lines(Path(out) / PARTS / "runs.jsonl")


class _Kept:
    """An interrupted demo's finished pieces in ``out/.parts``: each seed's measurements and each
    (seed, method, budget) run, appended, fsynced, as they finish."""

    def __init__(self, out: Path, settings: dict, resume: bool, overwrite: bool) -> None:
        check_demo_folder(out, resume, overwrite)
        self.folder = out / PARTS
        recorded = self.folder / "settings.json"
        if resume:
            refuse_other_settings(out, json.loads(recorded.read_text(encoding="utf-8")), settings)
        else:
            if overwrite:
                shutil.rmtree(self.folder, ignore_errors=True)
                for path in [out / name for name in REPORT_FILES] + list(out.glob("seed*-*")):
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            self.folder.mkdir(parents=True)
            write_atomically(recorded, json.dumps(settings, indent=1))
        self.seeds = {line["seed"]: line for line in self._lines("seeds.jsonl")}
        self.runs = {(line["seed"], line["method"], line["budget"]): line for line in self._lines("runs.jsonl")}

    def _lines(self, name: str) -> list[dict]:
        drop_cut_line(self.folder / name)
        return json_lines(self.folder / name)

    def add(self, name: str, line: dict) -> None:
        with open(self.folder / name, "a", encoding="utf-8") as f:
            append_line(f, line)

    def seed_measures(self, seed: int, measure) -> dict:
        """The seed's teacher decay and guidance, measured now unless an earlier run kept them."""
        if seed not in self.seeds:
            self.seeds[seed] = json.loads(json.dumps(dict(seed=seed, **measure())))  # as a resume reads it
            self.add("seeds.jsonl", self.seeds[seed])
        return self.seeds[seed]

    def run(self, seed: int, method: str, budget: str, train) -> dict:
        """The run's result, trained now unless an earlier run kept it."""
        key = (seed, method, budget)
        if key not in self.runs:
            self.runs[key] = json.loads(json.dumps(train()))  # as a resume reads it
            self.add("runs.jsonl", self.runs[key])
        return self.runs[key]


def warm_start(tokenizer, seed: int, size: DemoSize, device: str, validation) -> tuple[torch.nn.Module, float]:
    """A seed's warm-started student and its greedy validation accuracy."""
    student = warm_student(tokenizer, seed, size, device)
    return student, greedy_accuracy(student, tokenizer, validation)


def run_demo(
    out: str | Path = "motab-demo",
    *,
    seeds: int = 1,
    steps: int | None = None,
    quick: bool = False,
    device: str = "cpu",
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Runs every method for every seed under the protocol (reports/demo/PROTOCOL.md) and writes
    the report, its provenance included; returns the results. Per seed, one warm start; every
    method trains from it twice over: at equal steps (``size.steps``) and at equal wall clock (the
    training time ``CLOCK_METHOD`` needs for those steps); the test split is read only to evaluate
    those final students. Each finished run is kept in ``out/.parts`` until the report is written,
    so an interrupted demo continues with ``resume=True`` (``motab demo --resume``) and trains only
    what it had not finished; a folder that holds a demo is refused without ``resume`` or
    ``overwrite``."""
    started, load_at_start = time.time(), os.getloadavg()
    command = demo_command(seeds=seeds, steps=steps, quick=quick, device=device, out=out)
    size = QUICK if quick else FULL
    if steps is not None:
        size = replace(size, steps=steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kept = _Kept(out, dict(size=size.__dict__, device=device), resume, overwrite)
    with without_hf_bars():
        teacher, tokenizer = load_teacher(device)
    train = as_problems(tokenizer, generate_split("train", 5000))
    validation = generate_split("validation", size.validation)
    test = generate_split("test", size.test)
    options = tuned_options()
    results = dict(size=size.__dict__, seeds=seeds, methods={}, runs=[])
    results["teacher_validation_accuracy"] = greedy_accuracy(teacher, tokenizer, validation)
    for seed in range(seeds):
        warm = functools.cache(lambda seed=seed: warm_start(tokenizer, seed, size, device, validation))
        measured = kept.seed_measures(
            seed,
            lambda warm=warm: dict(
                teacher_decay=teacher_decay(warm()[0], teacher, tokenizer, validation[: size.decay_problems]),
                teacher_guidance=teacher_guidance(warm()[0], teacher, tokenizer, validation),
            ),
        )
        results.setdefault("teacher_decay", []).append(measured["teacher_decay"])
        results.setdefault("teacher_guidance", []).append(measured["teacher_guidance"])

        def train_method(method: str, steps: int, budget: str, seed=seed, warm=warm) -> dict:
            # the warm start is made only when a run is not kept (a resumed seed may need none)
            return kept.run(seed, method, budget, lambda: trained_run(method, steps, budget, *warm(), seed))

        def trained_run(method: str, steps: int, budget: str, student, warm: float, seed: int) -> dict:
            trained = copy.deepcopy(student)
            folder = out / f"seed{seed}-{method}-{budget}"
            config = replace(method_config(tokenizer, method, options[method], size, folder, seed), steps=steps)
            run = run_method(trained, teacher, tokenizer, train, validation, config, progress)
            run.update(seed=seed, budget=budget, warm_start_validation_accuracy=warm, options=options[method])
            run.update(test_grades(trained, tokenizer, test))
            if method == "motab" and budget == "steps":
                shown = plotted_rollout_config(config.rollout, quick)
                _render_rollout(trained, teacher, train, shown, seed, out / "rollout.png")
            return run

        equal_steps = {method: train_method(method, size.steps, "steps") for method in METHODS}
        clock = equal_steps[CLOCK_METHOD]["train_seconds"]
        for method, run in equal_steps.items():
            results["runs"].append(run)
            steps_in_clock = max(1, round(size.steps * clock / run["train_seconds"]))
            if steps_in_clock == size.steps:  # the same training: the same student, evaluated once
                results["runs"].append(dict(run, budget="time"))
            else:
                results["runs"].append(train_method(method, steps_in_clock, "time"))
            took = results["runs"][-1]["train_seconds"]
            if abs(took - clock) > CLOCK_TOLERANCE * clock:
                results.setdefault("clock_warnings", []).append(
                    f"seed {seed} {method}: its equal-wall-clock run trained {took:.0f} s against {clock:.0f} s; "
                    "the machine's load changed between runs, so that row is not at equal wall clock"
                )
    for warning in results.get("clock_warnings", []):
        print("warning:", warning)
    results["methods"] = summarize(results["runs"])
    results["provenance"] = provenance(command, device, started, load_at_start)
    curves = [r for r in results["runs"] if r["budget"] == "steps"]
    plot_accuracy_curves(curves, list(METHODS), out / "accuracy.png")
    write_atomically(out / "results.json", json.dumps(results, indent=1))
    shutil.rmtree(kept.folder)  # the report holds every run now
    print(format_table(results))
    return results


def demo_command(*, seeds: int, steps: int | None, quick: bool, device: str, out) -> str:
    """The ``motab demo`` command line that runs these settings."""
    flags = [f"--seeds {seeds}"] * (seeds != 1) + [f"--steps {steps}"] * (steps is not None) + ["--quick"] * quick
    return " ".join(["motab demo", *flags, *[f"--device {device}"] * (device != "cpu"), f"--out {out}"])


def provenance(command: str, device: str, started: float, load_at_start: tuple[float, float, float]) -> dict:
    """What a run record carries beside its results: the command, the code's commit, the machine
    and its load averages (1, 5, 15 min) at the start and the end (the equal-wall-clock steps come
    from measured times, so they move with the load)."""
    return dict(
        command=command,
        date=str(date.today()),
        commit=source_commit(),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        device=device,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        seconds=round(time.time() - started),
        load_at_start=[round(x, 2) for x in load_at_start],
        load_at_end=[round(x, 2) for x in os.getloadavg()],
    )


def source_commit() -> str | None:
    """The git commit of the checkout this code runs from, with "+" when tracked files differ from
    it; None when the package is not run from a checkout of its own."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None  # installed inside some other repository (a venv in a checkout)
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def test_grades(model, tokenizer, test) -> dict:
    """Greedy test accuracy as the protocol grades it (the first ``#d``), and two checks of that
    grader for the stitched data of the paper's pipeline, which puts a flawed step (perhaps a wrong
    answer) before the marker: the accuracy by the last ``#d``, and the share of completions that
    write the marker at all."""
    _, written = greedy_solutions(model, tokenizer, test)
    texts = [tokenizer.decode(tokens) for tokens in written]
    return dict(
        test_accuracy=sum(is_correct(text, p) for text, p in zip(texts, test)) / len(test),
        test_accuracy_last_answer=sum(last_answer(text) == p.answer for text, p in zip(texts, test)) / len(test),
        test_marker_share=sum(PAPER_PRESET["marker"] in text for text in texts) / len(test),
    )


def summarize(runs: list[dict]) -> dict:
    """Per method and budget: test accuracy (mean, std over seeds), MOTAB's lead paired by seed,
    steps, training seconds, tokens by writer and interventions, each a mean over seeds."""
    summary = {}

    def by_seed(method, budget):
        return sorted((r for r in runs if r["method"] == method and r["budget"] == budget), key=lambda r: r["seed"])

    for method in METHODS:
        summary[method] = {}
        for budget in BUDGETS:
            mine = by_seed(method, budget)
            if not mine:
                continue
            accuracies = [r["test_accuracy"] for r in mine]

            summary[method][budget] = dict(
                test_accuracy_mean=statistics.mean(accuracies),
                test_accuracy_std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                motab_lead=_paired_lead(by_seed("motab", budget), mine),
                step_motab_lead=_paired_lead(by_seed("step_motab", budget), mine),
                test_accuracy_last_answer=statistics.mean(r["test_accuracy_last_answer"] for r in mine),
                test_marker_share=statistics.mean(r["test_marker_share"] for r in mine),
                steps=statistics.mean(r["steps"] for r in mine),
                train_seconds=statistics.mean(r["train_seconds"] for r in mine),
                interventions_per_100=statistics.mean(r["interventions_per_100"] for r in mine),
                student_tokens=statistics.mean(r["student_tokens"] for r in mine),
                teacher_tokens=statistics.mean(r["teacher_tokens"] for r in mine),
            )
    return summary


def run_method(student, teacher, tokenizer, train, validation, config: TrainConfig, progress: bool = True) -> dict:
    """Trains ``student`` in place by ``config`` with its method: online distillation, or the
    paper's pipeline (synthesis, then SFT)."""
    if config.rollout.mode in PAPER_METHODS:
        return synthesize_and_sft(student, teacher, tokenizer, train, validation, config, progress)
    return distil(student, teacher, tokenizer, train, validation, config, progress)


def synthesize_and_sft(student, teacher, tokenizer, train, validation, config: TrainConfig, progress=True) -> dict:
    """The paper's pipeline at the demo's budget, counted as the online methods count theirs: the
    SFT takes ``config.steps`` optimizer steps of ``prompts_per_step`` records (one epoch over
    ``steps × prompts_per_step`` records, ``RESPONSES`` per question, questions drawn from the train
    split by the seed), so every method trains on as many sequences; its training time is the
    synthesis (rollouts with the warm student) plus the SFT. The learning rate is
    ``config.learning_rate``; the rest are the scripts' SFT settings (cosine to 1e-6, 5 % warm-up,
    weight decay 0.1, Adam β2 0.95), without packing (a batch is its records, as the online
    methods' batch is its rollouts)."""
    steps, batch, seed = config.steps, config.prompts_per_step, config.seed
    count = -(-steps * batch // RESPONSES)
    questions = [Question(i, train[i].prompt) for i in random.Random(seed).sample(range(len(train)), count)]
    before = greedy_accuracy(student, tokenizer, validation)
    options = SynthesisOptions(responses=RESPONSES, marker=PAPER_PRESET["marker"], seed=seed, batch_size=64)
    sft = SFTOptions(
        learning_rate=config.learning_rate,
        num_train_epochs=1,
        max_steps=steps,
        per_device_train_batch_size=batch,
        packing=False,
        max_length=256,
        gradient_checkpointing=False,
        save_steps=steps,
        save_total_limit=1,
        seed=seed,
        logging_steps=max(steps // 4, 1),
        progress=False,
    )
    with tempfile.TemporaryDirectory() as work:
        records_path = Path(work) / "records.jsonl"
        started = time.perf_counter()
        student.eval()
        synthesize(student, teacher, tokenizer, questions, records_path, config.rollout, options, progress=False)
        synthesized = time.perf_counter()
        run_sft(student, records_path, Path(work) / "sft", sft, tokenizer=tokenizer)
        finished = time.perf_counter()
        records = [json.loads(line) for line in records_path.read_text(encoding="utf-8").splitlines()]
    student.eval()
    after = greedy_accuracy(student, tokenizer, validation)
    if progress:
        print(f"  seed {seed} {config.rollout.mode:>13}: {len(records)} records, SFT {steps} steps", flush=True)
    counts = training_tokens(records, tokenizer)
    return dict(
        method=config.rollout.mode,
        steps=steps,
        curve=[(0, before), (steps, after)],
        validation_accuracy=after,
        interventions_per_100=100 * counts["corrections"] / max(counts["student"] + counts["teacher"], 1),
        student_tokens=counts["student"],
        teacher_tokens=counts["teacher"],
        train_seconds=finished - started,
        synthesis_seconds=synthesized - started,
        breach_rate=sum(r["breach"] for r in records) / len(records),
        weights_digest=weights_digest(student),
    )


def training_tokens(records: list[dict], tokenizer) -> dict:
    """Tokens of the training texts by writer (the marker counted for neither) and the teacher's
    corrections in them: a step_motab correction, or a step the teacher rewrote (step_skd)."""
    counts = dict(student=0, teacher=0, corrections=0)
    for record in records:
        for step in record["steps"]:
            if step["kept"] or (record["breach"] and step["writer"] == "student"):
                counts[step["writer"]] += len(tokenizer(step["text"])["input_ids"])
        if record["correction"] is not None:
            counts["teacher"] += len(tokenizer(record["correction"])["input_ids"])
            counts["corrections"] += 1
        elif record["steps"] and record["steps"][0]["writer"] == "student":
            counts["corrections"] += sum(1 for s in record["steps"] if s["writer"] == "teacher")
    return counts


def _paired_lead(leader: list[dict], runs: list[dict]) -> list[float]:
    """The leader's test accuracy minus the runs', seed by seed (empty when the leader did not run)."""
    return [a["test_accuracy"] - b["test_accuracy"] for a, b in zip(leader, runs)]


def distil(student, teacher, tokenizer, train, validation, config: TrainConfig, progress: bool = True) -> dict:
    """Trains ``student`` in place by ``config``; its validation accuracy along the way, token counts,
    the wall time of the training steps alone (rollout, loss, update; the validation evaluations are
    not counted) and a digest of the trained weights (the test split is left to the caller)."""
    trainer = DistillationTrainer(student, teacher, tokenizer, train, config)
    method, steps = config.rollout.mode, config.steps
    eval_every = max(1, steps // 4)
    curve = [(0, greedy_accuracy(student, tokenizer, validation))]
    totals = dict(student_tokens=0, teacher_tokens=0, interventions=0.0, train_seconds=0.0)
    for step in range(1, steps + 1):
        started = time.perf_counter()
        metrics = trainer.train_step()
        totals["train_seconds"] += time.perf_counter() - started
        totals["student_tokens"] += metrics["student_tokens"]
        totals["teacher_tokens"] += metrics["teacher_tokens"]
        totals["interventions"] += metrics["interventions_per_100"]
        if step % eval_every == 0 or step == steps:
            curve.append((step, greedy_accuracy(student, tokenizer, validation)))
        if progress:
            print(f"  seed {config.seed} {method:>10}: step {step}/{steps} loss {metrics['loss']:.4f}", flush=True)
    return dict(
        method=method,
        steps=steps,
        curve=curve,
        validation_accuracy=curve[-1][1],
        interventions_per_100=totals["interventions"] / steps,
        student_tokens=totals["student_tokens"],
        teacher_tokens=totals["teacher_tokens"],
        train_seconds=totals["train_seconds"],
        weights_digest=weights_digest(student),
    )


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: two runs that trained the same weights share it."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# The quick demo's plotted rollout is held to a fixed boundary of this many nats. After its 20-step
# warm start the student strays everywhere alike, so the window rule (a stray is K × the recent mean)
# never fires and the plot would show no intervention; a fixed boundary does.
QUICK_PLOT_TAU = 1.0


def plotted_rollout_config(config: RolloutConfig, quick: bool) -> RolloutConfig:
    """The settings of the rollout drawn in ``rollout.png``: the trained method's own, except in the
    quick demo, whose plot is held to a fixed boundary so that it shows an intervention (the quick
    demo's training and results are unaffected)."""
    if not quick:
        return config
    return replace(config, monitor=replace(config.monitor, rule="fixed", tau=QUICK_PLOT_TAU))


def _render_rollout(student, teacher, train, config: RolloutConfig, seed: int, path: Path) -> None:
    """One MOTAB rollout of the trained student: the busiest of four."""
    shown = plotted_rollouts(student, teacher, [p.prompt_ids for p in train[:4]], config, seed)
    render_trajectory(max(shown, key=lambda t: (len(t.discarded), len(t.tokens))), path)


def plotted_rollouts(student, teacher, prompts: list[list[int]], config: RolloutConfig, seed: int) -> list:
    """The rollouts the plot picks from: one per prompt, each with a seed of its own from the run's."""
    return rollout(student, teacher, prompts, config, seeds=[seed * len(prompts) + i for i in range(len(prompts))])


def format_table(results: dict) -> str:
    """The two tables (equal steps, equal wall clock) and the measurements on the warm starts."""
    lines = []
    for budget, title in (("steps", "equal steps"), ("time", f"equal wall clock ({CLOCK_METHOD}'s training time)")):
        lines += [
            f"\n{title}:",
            "| method | test accuracy | motab's lead by seed | step_motab's lead by seed | steps | train s | "
            "interventions / 100 tokens | student tokens | teacher tokens |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, by_budget in results["methods"].items():
            if budget not in by_budget:
                continue
            m = by_budget[budget]
            lead, paper_lead = (
                "" if method == leader else ", ".join(f"{100 * x:+.1f}" for x in m[f"{leader}_lead"])
                for leader in ("motab", "step_motab")
            )
            lines.append(
                f"| {method} | {100 * m['test_accuracy_mean']:.1f} ± {100 * m['test_accuracy_std']:.1f} | {lead} | "
                f"{paper_lead} | "
                f"{m['steps']:.0f} | {m['train_seconds']:.0f} | {m['interventions_per_100']:.2f} | "
                f"{m['student_tokens']:.0f} | {m['teacher_tokens']:.0f} |"
            )
    lines.append(f"\nteacher validation accuracy: {100 * results['teacher_validation_accuracy']:.1f}%")
    for decay in results.get("teacher_decay", []):
        lines.append(
            "teacher accuracy after L student tokens: " + ", ".join(f"L={k}: {100 * v:.1f}%" for k, v in decay.items())
        )
    for guidance in results.get("teacher_guidance", []):
        lines.append(
            f"after the student's first wrong operand ({guidance['first_wrong']} solutions; the teacher "
            f"would have written the right one {guidance['teacher_right_at_first']} times), the teacher's "
            f"later operands follow the student's context {guidance['consistent']}, the problem "
            f"{guidance['true']}, neither {guidance['other']} times"
        )
    return "\n".join(lines)
