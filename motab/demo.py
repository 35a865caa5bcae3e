"""``motab demo``: MOTAB and its baselines on the toy task, with the shipped teacher, on a CPU.

One smaller student (same tokenizer, fewer and narrower layers) gets a brief supervised warm
start on a slice of the train split, so that its own samples mean something; then each method
(``off_policy``, ``on_policy``, ``skd``, ``adaswitch``, ``motab``) distils a copy of that same
student from the teacher for the same number of steps and prompts, and is evaluated (greedy, the
paged engine) on the validation split during training and on the test split at the end. The
report folder gets ``results.json``, ``accuracy.png`` (validation accuracy against the training
step, per method), ``rollout.png`` (one MOTAB rollout: scores, boundary, backtracks, teacher
tokens) and the teacher-decay measurement: the teacher's accuracy when it continues from the
warm-started student's first L tokens (the reversed exposure bias MOTAB addresses).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from motab.data import Problem
from motab.engine import RolloutConfig, SamplingConfig, rollout, with_tokenizer_defaults
from motab.evaluate import generate
from motab.monitor import MonitorConfig
from motab.toy.task import generate_split, is_correct
from motab.toy.train_teacher import greedy_accuracy, supervised_train, toy_model
from motab.trainer import DistillationTrainer, TrainConfig

METHODS = ("off_policy", "on_policy", "skd", "adaswitch", "motab")
STUDENT_SHAPE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)  # fmt: skip


@dataclass(frozen=True)
class DemoSize:
    steps: int
    prompts_per_step: int
    warm_steps: int
    warm_problems: int
    validation: int
    test: int
    eval_every: int
    decay_problems: int


# The default fills about 8 of the 10 minutes a 2-core CPU is allowed for one seed.
FULL = DemoSize(steps=150, prompts_per_step=32, warm_steps=300, warm_problems=1000, validation=100, test=300,
                eval_every=25, decay_problems=100)  # fmt: skip
QUICK = DemoSize(steps=3, prompts_per_step=8, warm_steps=20, warm_problems=100, validation=16, test=32, eval_every=3,
                 decay_problems=16)  # fmt: skip


def teacher_path() -> Path:
    return Path(str(resources.files("motab.toy") / "assets" / "teacher"))


def load_teacher(device: str = "cpu"):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = teacher_path()
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the toy teacher is missing from {path}: reinstall motab or run motab.toy.train_teacher"
        )
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def _problems(tokenizer, toy_problems):
    return [Problem(p.prompt, tokenizer(p.prompt)["input_ids"], p.answer, p.solution) for p in toy_problems]


def rollout_config(tokenizer, mode: str) -> RolloutConfig:
    """The methods' shared settings; only ``mode`` differs between them."""
    config = RolloutConfig(
        mode=mode,
        max_new_tokens=96,
        draft_len=4,
        backtrack="step",
        intervention="step",
        intervention_len=24,
        max_interventions=4,
        monitor=MonitorConfig(score="fkl", rule="window", window=16, window_factor=3.0, tau_min=0.3, warmup=4),
        student_sampling=SamplingConfig(temperature=1.0),
        teacher_sampling=SamplingConfig(temperature=0.0),
        keep_teacher_hidden=True,
    )
    return with_tokenizer_defaults(config, tokenizer)


def teacher_decay(student, teacher, tokenizer, problems, lengths=(0, 4, 8, 16, 24)) -> dict[int, float]:
    """Teacher accuracy when it continues (greedily) from the student's first L greedy tokens."""
    max_new_tokens = rollout_config(tokenizer, "off_policy").max_new_tokens
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    student_text = generate(student, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))
    accuracy = {}
    for length in lengths:
        prefixed = [prompt + tokens[:length] for prompt, tokens in zip(prompts, student_text)]
        continued = generate(teacher, tokenizer, prefixed, max_new_tokens=max_new_tokens, batch_size=len(prompts))
        texts = [tokenizer.decode(s[:length] + c) for s, c in zip(student_text, continued)]
        accuracy[length] = sum(is_correct(text, p) for text, p in zip(texts, problems)) / len(problems)
    return accuracy


def run_demo(out: str | Path = "motab-demo", *, seeds: int = 1, steps: int | None = None, quick: bool = False,
             device: str = "cpu", progress: bool = True) -> dict:  # fmt: skip
    """Runs every method for every seed and writes the report; returns the results."""
    size = QUICK if quick else FULL
    if steps is not None:
        size = replace(size, steps=steps, eval_every=max(1, steps // 4))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_teacher(device)
    train = _problems(tokenizer, generate_split("train", 5000))
    validation = generate_split("validation", size.validation)
    test = generate_split("test", size.test)
    results = dict(size=size.__dict__, seeds=seeds, methods={}, teacher_test_accuracy=None, runs=[])
    results["teacher_test_accuracy"] = greedy_accuracy(teacher, tokenizer, test)
    for seed in range(seeds):
        student = toy_model(tokenizer, STUDENT_SHAPE, seed).to(device)
        warm = generate_split("train", 5000)[: size.warm_problems]
        supervised_train(student, tokenizer, warm, steps=size.warm_steps, batch_size=32, lr=3e-3, seed=seed,
                         device=device)  # fmt: skip
        warm_accuracy = greedy_accuracy(student, tokenizer, test)
        decay = teacher_decay(student, teacher, tokenizer, test[: size.decay_problems])
        for method in METHODS:
            run = _train_method(copy.deepcopy(student), teacher, tokenizer, train, validation, test, method, seed,
                                size, out / f"seed{seed}-{method}", progress)  # fmt: skip
            run.update(seed=seed, warm_start_accuracy=warm_accuracy)
            results["runs"].append(run)
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
    _plot_curves(results, out / "accuracy.png")
    print(format_table(results))
    return results


def _train_method(student, teacher, tokenizer, train, validation, test, method, seed, size, folder, progress) -> dict:
    config = TrainConfig(output_dir=str(folder), steps=size.steps, prompts_per_step=size.prompts_per_step,
                         micro_batch=size.prompts_per_step, rollout=rollout_config(tokenizer, method),
                         learning_rate=1e-3, warmup_steps=2, save_every=10**9, seed=seed)  # fmt: skip
    trainer = DistillationTrainer(student, teacher, tokenizer, train, config)
    started = time.perf_counter()
    curve = [(0, greedy_accuracy(student, tokenizer, validation))]
    totals = dict(student_tokens=0, teacher_tokens=0, interventions=0.0)
    for step in range(1, size.steps + 1):
        metrics = trainer.train_step()
        totals["student_tokens"] += metrics["student_tokens"]
        totals["teacher_tokens"] += metrics["teacher_tokens"]
        totals["interventions"] += metrics["interventions_per_100"]
        if step % size.eval_every == 0 or step == size.steps:
            curve.append((step, greedy_accuracy(student, tokenizer, validation)))
        if progress:
            print(f"  seed {seed} {method:>10}: step {step}/{size.steps} loss {metrics['loss']:.4f}", flush=True)
    seconds = time.perf_counter() - started
    result = dict(method=method, curve=curve, test_accuracy=greedy_accuracy(student, tokenizer, test),
                  interventions_per_100=totals["interventions"] / size.steps, student_tokens=totals["student_tokens"],
                  teacher_tokens=totals["teacher_tokens"], seconds=seconds)  # fmt: skip
    if method == "motab":
        from motab.cli import render_trajectory

        prompts = [p.prompt_ids for p in train[:4]]
        shown = rollout(student, teacher, prompts, replace(config.rollout, keep_teacher_hidden=False), seeds=[seed])
        busiest = max(shown, key=lambda t: (len(t.discarded), len(t.tokens)))
        render_trajectory(busiest, folder.parent / "rollout.png")
    return result


def format_table(results: dict) -> str:
    lines = ["| method | test accuracy | interventions / 100 tokens | student tokens | teacher tokens | s |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for method, m in results["methods"].items():
        lines.append(f"| {method} | {100 * m['test_accuracy_mean']:.1f} ± {100 * m['test_accuracy_std']:.1f} | "
                     f"{m['interventions_per_100']:.2f} | {m['student_tokens']} | {m['teacher_tokens']} | "
                     f"{m['seconds']:.0f} |")  # fmt: skip
    lines.append(f"\nteacher test accuracy: {100 * results['teacher_test_accuracy']:.1f}%")
    for decay in results.get("teacher_decay", []):
        lines.append("teacher accuracy after L student tokens: " +
                     ", ".join(f"L={k}: {100 * v:.1f}%" for k, v in decay.items()))  # fmt: skip
    return "\n".join(lines)


def _plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        runs = [r for r in results["runs"] if r["method"] == method]
        steps = [s for s, _ in runs[0]["curve"]]
        mean = [statistics.mean(r["curve"][i][1] for r in runs) for i in range(len(steps))]
        ax.plot(steps, [100 * m for m in mean], marker="o", label=method)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
