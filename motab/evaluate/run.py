"""Sampling completions of benchmark problems and grading them into a results folder.

``evaluate_benchmarks`` (``motab eval``) samples every (problem, sample) of several benchmarks in
one continuously batched generation, on the paged engine or a vLLM engine. Each completion is
appended, fsynced, to ``OUT/.parts/samples.jsonl`` as its row finishes, so a killed eval resumes
(``resume=True``) without sampling again what is there; each sample's seed hashes (seed,
benchmark, problem id, sample index), so a completion depends on nothing else and a resume with
more samples keeps the first ones. At the end every completion is graded in this process's main
thread (math-verify's timeouts need it), and the folder gets, atomically:

- ``<benchmark>.jsonl``: one line a problem: its id, question, reference and, per sample, the
  completion, the extracted answer, the verdict, how it ended (``eos``, ``stop`` or ``length``:
  the token limit) and its tokens;
- ``results.json``: what produced them (motab's version, the command, the model, each benchmark's
  data and answer format, the sampling and prompt settings) and each benchmark's figures
  (``motab.evaluate.metrics``) with the overall average;
- ``results.md``: the same figures as a Markdown table.

Then ``.parts`` is removed. ``evaluate`` is the same on prompts already tokenised (one benchmark,
in memory; with ``out_dir`` the same files).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from motab.backends import vllm as vllm_backend
from motab.backends.vllm import is_vllm_engine
from motab.config import ConfigError, EvaluationConfig, RolloutConfig, SamplingConfig
from motab.engine import rollout_in_batches
from motab.evaluate.benchmarks import PAPER_SAMPLES, Benchmark, Problem
from motab.evaluate.formats import AnswerFormat, get_answer_format, opens_thought
from motab.evaluate.metrics import Score, default_ks, markdown_table, overall, score
from motab.policy import resolve
from motab.runs import (
    API_FLAGS,
    CLI_FLAGS,
    RowProgress,
    append_line,
    drop_cut_line,
    json_lines,
    refuse_other_settings,
    run_facts,
    write_atomically,
)
from motab.synthesis import prompt_text, response_seed

GREEDY = SamplingConfig(temperature=0.0)
PARTS = ".parts"
RESULTS = ("results.json", "results.md")
# vLLM samples a whole list in one call: this many requests a call, so a kill loses at most one call's work.
VLLM_REQUESTS_PER_CALL = 256


def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    seeds: Sequence[int] | None = None,
    batch_size: int | None = None,
    kv_tokens: int = 0,
    progress: bool | None = False,
    on_finished: Callable[[int, list[int], str | None], None] | None = None,
) -> list[list[int]]:
    """The token ids ``model`` writes alone after each prompt (the paged engine's ``off_policy``),
    at most ``batch_size`` rows in flight (None: as many as the pool holds), continuously batched,
    on one KV pool of ``kv_tokens`` (0: ``RolloutConfig.kv_tokens``'s default) allocated once; a
    ``vllm.LLM`` samples them in calls of ``VLLM_REQUESTS_PER_CALL``. ``seeds[i]`` fixes prompt i's
    sampling (default: i). ``on_finished(i, tokens, end)`` hears of each completion as it ends
    (``end``: ``eos``, ``stop`` or ``length``). ``progress`` shows a bar of rows done and tokens/s
    on stderr (None: only when stderr is a terminal)."""
    config = RolloutConfig(
        mode="off_policy", max_new_tokens=max_new_tokens, teacher_sampling=sampling, kv_tokens=kv_tokens
    )
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if is_vllm_engine(model):
        return _generate_on_vllm(model, tokenizer, prompts, config, seeds, progress, on_finished)

    def finished(index: int, trajectory) -> None:
        if on_finished is not None:
            on_finished(index, trajectory.tokens, trajectory.finish_reason)

    trajectories = rollout_in_batches(
        None, model, prompts, config, batch_size=batch_size, seeds=seeds, tokenizer=tokenizer, desc="generate",
        progress=progress, on_finished=finished,
    )  # fmt: skip
    return [t.tokens for t in trajectories]


def _generate_on_vllm(engine, tokenizer, prompts, config, seeds, progress, on_finished) -> list[list[int]]:
    config = resolve(config, tokenizer)[0]
    out: list[list[int]] = []
    with RowProgress(len(prompts), "generate", progress) as bar:
        for start in range(0, len(prompts), VLLM_REQUESTS_PER_CALL):
            chunk = [list(p) for p in prompts[start : start + VLLM_REQUESTS_PER_CALL]]
            written = vllm_backend.generate(engine, chunk, config, seeds[start : start + len(chunk)])
            for offset, (tokens, end) in enumerate(written):
                if on_finished is not None:
                    on_finished(start + offset, tokens, end)
                out.append(tokens)
            bar.update(len(chunk), sum(len(t) for t, _ in written))
    return out


# --- prompts -----------------------------------------------------------------------------------


def prompt_of(tokenizer, question: str, answer_format: AnswerFormat, prompt_format: str) -> list[int]:
    """The token ids the model reads, as ``motab.synthesis.prompt_text`` writes them: ``raw``, the
    bare question; ``chat``, the tokenizer's chat template around the question and the format's
    instruction (math: "Please reason step by step, and put your final answer within \\boxed{}.")."""
    if prompt_format == "chat" and answer_format.instruction:
        question = f"{question}\n{answer_format.instruction}"
    text = prompt_text(tokenizer, question, prompt_format)
    return tokenizer(text, add_special_tokens=prompt_format == "raw")["input_ids"]


# --- grading -----------------------------------------------------------------------------------


def grade_problem(problem: Problem, samples: Sequence[dict], answer_format: AnswerFormat, thought_open: bool) -> dict:
    """A problem's line of ``<benchmark>.jsonl`` from its samples (dicts with ``completion``,
    ``end`` and ``tokens``, in sample order)."""
    graded = [answer_format.grade(s["completion"], problem.reference, thought_open=thought_open) for s in samples]
    correct = [ok for _, ok in graded]
    return dict(
        id=problem.id,
        question=problem.question,
        reference=problem.reference,
        completions=[s["completion"] for s in samples],
        extracted=[answer for answer, _ in graded],
        correct=correct,
        end=[s["end"] for s in samples],
        tokens=[s["tokens"] for s in samples],
        accuracy=sum(correct) / len(correct),
    )


def score_lines(lines: Sequence[dict], ks: Sequence[int]) -> Score:
    """A benchmark's figures from its problems' lines."""
    return score(
        [line["correct"] for line in lines],
        ks,
        answered=[[e is not None for e in line["extracted"]] for line in lines],
        finished=[[end != "length" for end in line["end"]] for line in lines],
        tokens=[line["tokens"] for line in lines],
    )


def pass_ks(config: EvaluationConfig, samples: int) -> list[int]:
    """The k of pass@k a benchmark of ``samples`` samples reports (``evaluation.pass_k``, else
    ``default_ks``); a k above the samples is refused."""
    if config.pass_k is None:
        return default_ks(samples)
    too_big = [k for k in config.pass_k if k > samples]
    if too_big:
        raise ConfigError(
            f"evaluation.pass_k: pass@{too_big[0]} needs at least {too_big[0]} samples a problem, but a benchmark "
            f"draws {samples} (raise --samples or lower --pass-k)"
        )
    return sorted(set(config.pass_k))


def samples_of(config: EvaluationConfig, benchmark: str | None) -> int:
    """Samples a problem: ``evaluation.samples``, or (None) the paper's count for the benchmark (1 for a file)."""
    return config.samples if config.samples is not None else PAPER_SAMPLES.get(benchmark, 1)


@dataclass
class EvalResult:
    """One benchmark's figures (``score``) and its problems' lines; ``accuracy`` is avg@n."""

    score: Score
    per_problem: list[dict]

    @property
    def accuracy(self) -> float:
        return self.score.avg

    @property
    def pass_at_k(self) -> dict[int, float]:
        return {k: value for k, (value, _) in self.score.pass_at.items()}


@dataclass
class EvalReport:
    """Every benchmark's result and their average, as written to ``results.json``."""

    results: dict[str, EvalResult]
    overall: Score
    record: dict = field(default_factory=dict)


# --- the results folder ------------------------------------------------------------------------


def is_used(out: Path) -> bool:
    """Whether ``out`` holds an evaluation: its results or an interrupted one's samples."""
    return any((out / name).exists() for name in (*RESULTS, PARTS))


def check_output(out: str | Path, resume: bool, overwrite: bool, flags: tuple[str, str] = CLI_FLAGS) -> None:
    """Refuses a used folder without ``resume`` or ``overwrite``, both at once, and a resume of a
    folder with nothing to resume; reads only (the CLI calls it before a model loads). ``flags``
    name resume and overwrite as the caller spells them."""
    out = Path(out)
    resume_flag, overwrite_flag = flags
    if resume and overwrite:
        raise ConfigError(f"{resume_flag} and {overwrite_flag} exclude each other: continue the eval or start it again")
    if resume and not (out / PARTS).is_dir():
        done = f" (it is complete: {overwrite_flag} runs it again)" if (out / "results.json").exists() else ""
        raise ConfigError(f"nothing to resume in {out}: no {PARTS} folder of an interrupted eval{done}")
    if not (resume or overwrite) and is_used(out):
        raise ConfigError(
            f"{out} holds an evaluation (results.json or an interrupted one's {PARTS}): pass {resume_flag} to continue "
            f"it or {overwrite_flag} to run it again there, or choose another output folder"
        )


def _clear(out: Path, benchmarks: Sequence[str]) -> None:
    """What ``overwrite`` removes: the results, the samples and the benchmark files of this eval
    and of the one results.json records; nothing else."""
    names = set(benchmarks)
    recorded = out / "results.json"
    if recorded.exists():
        try:
            names |= set(json.loads(recorded.read_text(encoding="utf-8")).get("benchmarks", {}))
        except (ValueError, AttributeError):
            pass
    shutil.rmtree(out / PARTS, ignore_errors=True)
    for path in [out / name for name in RESULTS] + [out / f"{name}.jsonl" for name in names]:
        path.unlink(missing_ok=True)


def _settings(config: EvaluationConfig, model: str, benchmarks: Sequence[Benchmark]) -> dict:
    """What a resumed eval must share with the interrupted one: what changes a completion. The
    samples, the grading (answer format, pass@k) and the memory (batch size, KV pool) may change."""
    kept = ("temperature", "top_p", "max_new_tokens", "seed", "prompt_format")
    return dict(
        model=model,
        data={b.name: b.path for b in benchmarks},
        sampling={name: getattr(config, name) for name in kept},
    )


def _prepare(out: Path, settings: dict, benchmarks: Sequence[Benchmark], resume: bool, overwrite: bool,
             flags: tuple[str, str]) -> None:  # fmt: skip
    check_output(out, resume, overwrite, flags)
    recorded = out / PARTS / "settings.json"
    if resume:
        if recorded.exists():
            refuse_other_settings(
                out, json.loads(recorded.read_text(encoding="utf-8")), json.loads(json.dumps(settings))
            )
        return
    if overwrite:
        _clear(out, [b.name for b in benchmarks])
    (out / PARTS).mkdir(parents=True)
    write_atomically(recorded, json.dumps(settings, indent=1, sort_keys=True))


def _done_samples(path: Path) -> dict[tuple[str, str, int], dict]:
    """The samples already written, by (benchmark, id, sample) (a line cut short by a kill is dropped)."""
    return {(sample["benchmark"], str(sample["id"]), sample["sample"]): sample for sample in json_lines(path)}


# --- the evaluation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    benchmark: str
    problem: Problem
    sample: int
    prompt: tuple[int, ...]
    seed: int


def evaluate_benchmarks(
    model,
    tokenizer,
    benchmarks: Sequence[Benchmark],
    config: EvaluationConfig,
    out: str | Path,
    *,
    model_name: str = "",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = False,
    command: Sequence[str] | None = None,
    flags: tuple[str, str] = API_FLAGS,
) -> EvalReport:
    """Samples, grades and scores ``benchmarks`` into the folder ``out`` (see the module
    docstring); ``model_name`` is what results.json records as the model (its path or hub id).
    ``flags``: how refusals name resume and overwrite (the command passes its flags)."""
    out = Path(out)
    formats = {b.name: get_answer_format(b.answer_format) for b in benchmarks}  # unknown ones refused first
    samples = {b.name: samples_of(config, b.name) for b in benchmarks}
    ks = {b.name: pass_ks(config, samples[b.name]) for b in benchmarks}
    prompts = {}
    for b in benchmarks:
        for p in b.problems:
            prompts[b.name, p.id] = tuple(prompt_of(tokenizer, p.question, formats[b.name], config.prompt_format))
    _prepare(out, _settings(config, model_name, benchmarks), benchmarks, resume, overwrite, flags)
    store = out / PARTS / "samples.jsonl"
    drop_cut_line(store)
    done = _done_samples(store)
    jobs = [
        _Job(b.name, p, i, prompts[b.name, p.id], response_seed(config.seed, f"{b.name}/{p.id}", i))
        for b in benchmarks
        for p in b.problems
        for i in range(samples[b.name])
        if (b.name, p.id, i) not in done
    ]
    started = time.perf_counter()
    try:
        _sample(model, tokenizer, config, jobs, store, done, progress)
    except BaseException:
        if not resume and not done:  # a new eval that wrote nothing leaves no trace: it can simply run again
            shutil.rmtree(out / PARTS, ignore_errors=True)
        raise

    seconds = time.perf_counter() - started
    results = {}
    for b in benchmarks:
        lines = []
        for p in b.problems:
            thought_open = opens_thought(tokenizer.decode(list(prompts[b.name, p.id]), skip_special_tokens=False))
            drawn = [done[b.name, p.id, i] for i in range(samples[b.name])]
            lines.append(grade_problem(p, drawn, formats[b.name], thought_open))
        results[b.name] = EvalResult(score_lines(lines, ks[b.name]), lines)
    record = _record(config, model_name, benchmarks, formats, samples, command, len(jobs), seconds)
    report = EvalReport(results, overall([r.score for r in results.values()]), record)
    write_results(out, report)
    shutil.rmtree(out / PARTS)
    return report


def _sample(model, tokenizer, config: EvaluationConfig, jobs: list, store: Path, done: dict, progress) -> None:
    """Samples ``jobs``, each completion appended, fsynced, to ``store`` (and to ``done``) as it ends."""
    with open(store, "a", encoding="utf-8") as sink:

        def keep(index: int, tokens: list[int], end: str | None) -> None:
            """A completion, on disk as soon as it ends (a kill loses only the rows in flight)."""
            job = jobs[index]
            sample = dict(
                benchmark=job.benchmark,
                id=job.problem.id,
                sample=job.sample,
                completion=tokenizer.decode(tokens, skip_special_tokens=True),
                end=end,
                tokens=len(tokens),
            )
            append_line(sink, sample)
            done[job.benchmark, job.problem.id, job.sample] = sample

        if jobs:
            generate(
                model, tokenizer, [job.prompt for job in jobs],
                max_new_tokens=config.max_new_tokens,
                sampling=SamplingConfig(temperature=config.temperature, top_p=config.top_p),
                seeds=[job.seed for job in jobs], batch_size=config.batch_size, kv_tokens=config.kv_tokens,
                progress=progress, on_finished=keep,
            )  # fmt: skip


def _record(config, model_name, benchmarks, formats, samples, command, generated, seconds) -> dict:
    settings = asdict(config)
    settings.pop("answer_format")  # per benchmark below
    return run_facts(
        None if command is None else list(command),
        model=model_name,
        settings=settings,
        data={
            b.name: dict(path=b.path, answer_format=formats[b.name].name, samples=samples[b.name]) for b in benchmarks
        },
        generated=generated,
        seconds=round(seconds, 3),
    )


def write_results(out: str | Path, report: EvalReport) -> None:
    """Each benchmark's problems (``<name>.jsonl``), ``results.json`` and ``results.md``, atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, result in report.results.items():
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in result.per_problem)
        write_atomically(out / f"{name}.jsonl", text)
    scores = {name: result.score for name, result in report.results.items()}
    document = report.record | dict(
        benchmarks={name: s.to_dict() for name, s in scores.items()}, overall=report.overall.to_dict()
    )
    write_atomically(out / "results.json", json.dumps(document, indent=1, ensure_ascii=False))
    write_atomically(out / "results.md", markdown_table(scores))


def evaluate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    samples: int = 1,
    max_new_tokens: int = 512,
    sampling: SamplingConfig = GREEDY,
    pass_k: Sequence[int] | None = None,
    batch_size: int | None = None,
    kv_tokens: int = 0,
    seed: int = 0,
    out_dir: str | Path | None = None,
    answer_format: str | AnswerFormat = "math",
    name: str = "benchmark",
    progress: bool | None = False,
) -> EvalResult:
    """Generates ``samples`` completions per prompt (token ids) with the paged engine (or a
    ``vllm.LLM``) and grades them against ``answers`` in ``answer_format`` (a registered name or an
    ``AnswerFormat``; ``answer_formats()`` lists the names): avg@n and pass@k (``pass_k``, default 1,
    the powers of two below n, and n) with standard errors. Sample j of prompt i samples with
    ``response_seed(seed, f"{name}/{i}", j)``. With ``out_dir``: ``<name>.jsonl``, ``results.json``
    and ``results.md``, as ``motab eval`` writes them."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if samples < 1:
        raise ValueError(f"samples must be ≥ 1, got {samples}")
    grader = get_answer_format(answer_format)  # an unknown format is refused before any generation
    config = EvaluationConfig(samples=samples, pass_k=None if pass_k is None else tuple(pass_k))
    try:
        ks = pass_ks(config, samples)
    except ConfigError as error:
        raise ValueError(str(error)) from error
    jobs = [(i, k) for i in range(len(prompts)) for k in range(samples)]
    ends: dict[int, str | None] = {}
    written = generate(
        model, tokenizer, [prompts[i] for i, _ in jobs],
        max_new_tokens=max_new_tokens, sampling=sampling,
        seeds=[response_seed(seed, f"{name}/{i}", k) for i, k in jobs],
        batch_size=batch_size, kv_tokens=kv_tokens, progress=progress,
        on_finished=lambda index, tokens, end: ends.__setitem__(index, end),
    )  # fmt: skip
    drawn: dict[int, list[dict]] = {i: [] for i in range(len(prompts))}
    for index, ((i, _), tokens) in enumerate(zip(jobs, written)):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        drawn[i].append(dict(completion=text, end=ends.get(index), tokens=len(tokens)))
    lines = []
    for i, answer in enumerate(answers):
        thought_open = opens_thought(tokenizer.decode(list(prompts[i]), skip_special_tokens=False))
        problem = Problem(str(i), "", str(answer))
        lines.append(grade_problem(problem, drawn[i], grader, thought_open) | dict(index=i))
    result = EvalResult(score_lines(lines, ks), lines)
    if out_dir is not None:
        settings = replace(config, max_new_tokens=max_new_tokens, temperature=sampling.temperature,
                           top_p=sampling.top_p, seed=seed, answer_format=grader.name)  # fmt: skip
        record = dict(settings=asdict(settings), data={name: dict(answer_format=grader.name, samples=samples)})
        write_results(out_dir, EvalReport({name: result}, result.score, record))
    return result
