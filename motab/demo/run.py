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
import json
import statistics
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from motab.config import TrainConfig, build_configs, set_option
from motab.data import Problem
from motab.demo.measures import teacher_decay, teacher_guidance
from motab.demo.toy_models import MAX_SOLUTION_TOKENS, greedy_accuracy, supervised_train, toy_model
from motab.engine import rollout, with_tokenizer_defaults
from motab.plots import plot_accuracy_curves, render_trajectory
from motab.toy.task import generate_split
from motab.toy.teacher import load_teacher
from motab.trainer import DistillationTrainer

METHODS = ("off_policy", "on_policy", "skd", "adaswitch", "motab")
STUDENT_SHAPE = dict(
    hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


@dataclass(frozen=True)
class DemoSize:
    steps: int
    prompts_per_step: int
    warm_steps: int
    warm_problems: int
    validation: int
    test: int
    decay_problems: int


# The default takes about 6 of the 10 minutes a 2-core CPU is allowed for one seed. The warm start
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

# The tuning grid (``python -m motab.demo.tune``): the same number of settings for every method —
# the learning rate and one option that is the method's own — tried from the same warm start and
# judged on the validation split only. For the two monitored methods that option is the boundary:
# K barely matters here (a first grid over K = 3, 2, 1.5 gave the same decisions: the students'
# windowed mean divergence is so small that the τ_min floor is the boundary), so the grid varies
# the floor and the score — fkl measures the student's uncertainty whatever it wrote, the
# teacher's surprise (teacher_nll) what it wrote.
BOUNDARIES = (
    {"monitor.score": "fkl", "monitor.tau_min": 0.3},
    {"monitor.score": "fkl", "monitor.tau_min": 1.0},
    {"monitor.score": "teacher_nll", "monitor.tau_min": 2.0},
)
TUNING_GRID = {
    "off_policy": [
        {"train.learning_rate": lr, "teacher_sampling.temperature": t} for lr in (1e-3, 3e-3) for t in (0.0, 0.7, 1.0)
    ],
    "on_policy": [
        {"train.learning_rate": lr, "student_sampling.temperature": t} for lr in (1e-3, 3e-3) for t in (1.0, 0.7, 0.5)
    ],
    "skd": [{"train.learning_rate": lr, "monitor.skd_top_k": k} for lr in (1e-3, 3e-3) for k in (25, 10, 5)],
    "adaswitch": [{"train.learning_rate": lr, **boundary} for lr in (1e-3, 3e-3) for boundary in BOUNDARIES],
    "motab": [{"train.learning_rate": lr, **boundary} for lr in (1e-3, 3e-3) for boundary in BOUNDARIES],
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
    return replace(train, rollout=with_tokenizer_defaults(rollout, tokenizer))


def warm_student(tokenizer, seed: int, size: DemoSize, device: str = "cpu"):
    """The student every method starts from: supervised on a slice of the train split."""
    student = toy_model(tokenizer, STUDENT_SHAPE, seed).to(device)
    warm = generate_split("train", size.warm_problems)
    supervised_train(
        student, tokenizer, warm, steps=size.warm_steps, batch_size=32, lr=WARM_LEARNING_RATE, seed=seed, device=device
    )
    return student


def run_demo(
    out: str | Path = "motab-demo",
    *,
    seeds: int = 1,
    steps: int | None = None,
    quick: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Runs every method for every seed and writes the report; returns the results."""
    size = QUICK if quick else FULL
    if steps is not None:
        size = replace(size, steps=steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_teacher(device)
    train = as_problems(tokenizer, generate_split("train", 5000))
    validation = generate_split("validation", size.validation)
    test = generate_split("test", size.test)
    options = tuned_options()
    results = dict(size=size.__dict__, seeds=seeds, methods={}, teacher_test_accuracy=None, runs=[])
    results["teacher_test_accuracy"] = greedy_accuracy(teacher, tokenizer, test)
    for seed in range(seeds):
        student = warm_student(tokenizer, seed, size, device)
        warm_accuracy = greedy_accuracy(student, tokenizer, test)
        decay = teacher_decay(student, teacher, tokenizer, test[: size.decay_problems])
        results.setdefault("teacher_guidance", []).append(teacher_guidance(student, teacher, tokenizer, validation))
        for method in METHODS:
            trained = copy.deepcopy(student)
            config = method_config(tokenizer, method, options[method], size, out / f"seed{seed}-{method}", seed)
            run = distil(trained, teacher, tokenizer, train, validation, config, progress)
            run.update(
                seed=seed,
                warm_start_accuracy=warm_accuracy,
                options=options[method],
                test_accuracy=greedy_accuracy(trained, tokenizer, test),
            )
            results["runs"].append(run)
            if method == "motab":
                _render_rollout(trained, teacher, train, config, seed, out / "rollout.png")
        results.setdefault("teacher_decay", []).append(decay)
    for method in METHODS:
        runs = [r for r in results["runs"] if r["method"] == method]
        accuracies = [r["test_accuracy"] for r in runs]
        results["methods"][method] = dict(
            test_accuracy_mean=statistics.mean(accuracies),
            test_accuracy_std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            interventions_per_100=statistics.mean(r["interventions_per_100"] for r in runs),
            student_tokens=sum(r["student_tokens"] for r in runs),
            teacher_tokens=sum(r["teacher_tokens"] for r in runs),
            seconds=statistics.mean(r["seconds"] for r in runs),
        )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_accuracy_curves(results["runs"], list(METHODS), out / "accuracy.png")
    print(format_table(results))
    return results


def distil(student, teacher, tokenizer, train, validation, config: TrainConfig, progress: bool = True) -> dict:
    """Trains ``student`` in place by ``config``; its validation accuracy along the way, token counts
    and wall time (the test split is left to the caller)."""
    trainer = DistillationTrainer(student, teacher, tokenizer, train, config)
    method, steps = config.rollout.mode, config.steps
    eval_every = max(1, steps // 4)
    started = time.perf_counter()
    curve = [(0, greedy_accuracy(student, tokenizer, validation))]
    totals = dict(student_tokens=0, teacher_tokens=0, interventions=0.0)
    for step in range(1, steps + 1):
        metrics = trainer.train_step()
        totals["student_tokens"] += metrics["student_tokens"]
        totals["teacher_tokens"] += metrics["teacher_tokens"]
        totals["interventions"] += metrics["interventions_per_100"]
        if step % eval_every == 0 or step == steps:
            curve.append((step, greedy_accuracy(student, tokenizer, validation)))
        if progress:
            print(f"  seed {config.seed} {method:>10}: step {step}/{steps} loss {metrics['loss']:.4f}", flush=True)
    return dict(
        method=method,
        curve=curve,
        validation_accuracy=curve[-1][1],
        interventions_per_100=totals["interventions"] / steps,
        student_tokens=totals["student_tokens"],
        teacher_tokens=totals["teacher_tokens"],
        seconds=time.perf_counter() - started,
    )


def _render_rollout(student, teacher, train, config: TrainConfig, seed: int, path: Path) -> None:
    """One MOTAB rollout of the trained student: the busiest of four."""
    prompts = [p.prompt_ids for p in train[:4]]
    shown = rollout(student, teacher, prompts, config.rollout, seeds=[seed])
    render_trajectory(max(shown, key=lambda t: (len(t.discarded), len(t.tokens))), path)


def format_table(results: dict) -> str:
    lines = [
        "| method | test accuracy | interventions / 100 tokens | student tokens | teacher tokens | s |",
        "|---|---|---|---|---|---|",
    ]
    for method, m in results["methods"].items():
        lines.append(
            f"| {method} | {100 * m['test_accuracy_mean']:.1f} ± {100 * m['test_accuracy_std']:.1f} | "
            f"{m['interventions_per_100']:.2f} | {m['student_tokens']} | {m['teacher_tokens']} | "
            f"{m['seconds']:.0f} |"
        )
    lines.append(f"\nteacher test accuracy: {100 * results['teacher_test_accuracy']:.1f}%")
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
