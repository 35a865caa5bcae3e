"""The paper's data synthesis: our engine (``motab.synthesis``) against a faithful
re-implementation of the reference scripts' loop on the same HF models.

The scripts' loop, per trajectory (one worker): the student writes a step with ``generate`` from
the context, its ``past_key_values`` kept across steps (as SGLang's prefix cache would keep them),
up to the stop string, EOS or the step budget; the teacher scores the step with a forward over
context + step (V = exp(mean log p)); the boundary's top-k entropy comes from another teacher
forward over the context; on the first breach the TD-error root cause is found, and the teacher
writes the rest with ``generate`` from the context before it. Our engine runs all rows in one
batch on the paged caches: one teacher forward verifies each draft, scores it and reads the next
boundary; a rewind truncates the caches in place.

With vLLM installed (``--vllm auto``, the default; its CPU build lives in a virtual environment of
its own), a third way: the same models saved to a folder and run by the vLLM step backend
(``motab.backends.vllm``: a whole step a request, the teacher's scoring read from its prefix
cache). Its teacher work is what vLLM reports: prompt tokens it prefilled rather than read from its
cache, plus the tokens it wrote.

Greedy decoding on every side, so all write the same records: the benchmark checks texts,
breaches and root causes exactly (V to 1e-3) and reports how many agree. Random models
(``--shape``: tiny on a CPU, Qwen2.5-0.5B-shaped on a GPU) with a character tokenizer whose
".\\n\\n" is one token, its LM-head row raised so that steps end; ε0 is set to the median of the
step values of an unbounded run, so that about half the steps would breach.

What does not depend on the machine comes first: per model, the tokens its decoder reads per
committed token (prompt and response; the physical minimum is one: each token enters each cache
once) and its forwards per step written. Times are the median, minimum and maximum of
``--repeats`` runs of each way, with the machine's load average, since a shared CPU's timings
move with its other work. Writes ``synthesis.json`` and ``synthesis.md`` under ``--out``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch
from _common import bench_parser, machine_load, parse_bench_args, run_facts, write_results
from _models import random_lm
from _timing import run_seconds
from transformers import StoppingCriteria, StoppingCriteriaList

from motab.config import MonitorConfig, RolloutConfig, SamplingConfig
from motab.steps import contains_stop_at_end, entropy_boundary, oracle_value, root_cause, topk_entropy
from motab.synthesis import Question, SynthesisOptions, stitch, synthesize
from motab.tiny import stop_tokenizer

SHAPES = {  # motab.tiny.tiny_config's arguments
    # heads of 32 dimensions: the smallest vLLM's CPU attention runs (the vLLM way on a CPU)
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1),
    "small": dict(hidden=256, intermediate=768, layers=4, heads=8, kv_heads=2),
    # Qwen2.5-0.5B's body (its 151936-entry head replaced by the benchmark tokenizer's)
    "qwen0.5b": dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2),
}
STOP = ".\n\n"


class StopAtString(StoppingCriteria):
    """Ends a one-row ``generate`` when the text of its new tokens holds the stop string (the tail
    only, as the engine checks)."""

    def __init__(self, tokenizer, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids, scores, **kwargs):
        return contains_stop_at_end(self.tokenizer, input_ids[0, self.start :].tolist(), [STOP])


class DecoderReads:
    """Counts the forwards of each model's decoder and the tokens they read (a pre-hook: every
    forward, whoever calls it: HF ``generate``, a scoring forward, the paged engine's extend)."""

    def __init__(self, **models: torch.nn.Module):
        self.forwards = dict.fromkeys(models, 0)
        self.tokens = dict.fromkeys(models, 0)
        self._hooks = [
            model.get_decoder().register_forward_pre_hook(self._counter(name), with_kwargs=True)
            for name, model in models.items()
        ]

    def _counter(self, name: str):
        def count(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.forwards[name] += 1
            self.tokens[name] += ids.numel() if ids is not None else kwargs["inputs_embeds"].shape[:-1].numel()

        return count

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def counted(run, student, teacher) -> tuple[object, DecoderReads]:
    """``run()``'s result and what it asked of each model's decoder."""
    reads = DecoderReads(student=student, teacher=teacher)
    try:
        return run(), reads
    finally:
        reads.close()


def scripts_loop(student, teacher, tokenizer, prompt: list[int], config: RolloutConfig) -> dict:
    """One trajectory the scripts' way (greedy); returns the record fields that the check compares."""
    device = next(student.parameters()).device
    eos = tokenizer.eos_token_id
    context = list(prompt)
    past = None
    steps, values, bounds = [], [], []
    breach = None
    while len(context) - len(prompt) < config.max_new_tokens:
        ids = torch.tensor([context], device=device)
        budget = min(config.max_step_tokens, config.max_new_tokens - (len(context) - len(prompt)))
        out = student.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=past,
            max_new_tokens=budget,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
            stopping_criteria=StoppingCriteriaList([StopAtString(tokenizer, len(context))]),
            return_dict_in_generate=True,
        )
        past = out.past_key_values
        step = out.sequences[0, len(context) :].tolist()
        with torch.no_grad():  # the scoring request: context + step, the teacher's log-probs of the step
            logits = teacher(torch.tensor([context + step], device=device)).logits[0].float()
            scored = step[:-1] if step[-1] == eos else step
            logp = logits[len(context) - 1 : len(context) - 1 + len(scored)].log_softmax(-1)
            value = oracle_value(
                logp[torch.arange(len(scored)), torch.tensor(scored, dtype=torch.long, device=device)].tolist()
            )
            # the boundary request: a teacher forward over the context alone, its top-k at the end
            head = teacher(torch.tensor([context], device=device)).logits[0, -1:].float()
            entropy = float(topk_entropy(head, config.monitor.entropy_top_k)[0])
        bound = entropy_boundary(entropy, config.monitor.epsilon0, config.monitor.theta)
        steps.append(step)
        values.append(value)
        bounds.append(bound)
        if value is not None and value < bound:
            breach = root_cause(values, bounds)
            break
        context += step
        if step[-1] == eos:
            break
    correction = None
    if breach is not None:
        start = len(prompt) + sum(len(s) for s in steps[:breach])
        rewound = torch.tensor([prompt + [t for s in steps[:breach] for t in s]], device=device)
        made = start - len(prompt)
        new = max(config.min_correction_tokens, config.max_new_tokens - made)
        out = teacher.generate(
            rewound, attention_mask=torch.ones_like(rewound), max_new_tokens=new, do_sample=False,
            eos_token_id=eos, pad_token_id=eos,
        )  # fmt: skip
        correction = tokenizer.decode(out[0, rewound.shape[1] :].tolist(), skip_special_tokens=True)
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in steps]
    return dict(
        output=stitch(texts, correction, "However,", trim_stop=False),
        breach=breach is not None,
        root_cause=breach,
        values=values,
        steps=len(steps),
    )


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--shape", default=None, help=f"one of {sorted(SHAPES)} (default: qwen0.5b on a GPU, tiny)")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 256 on a GPU, 64 on a CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each way (median, min, max)")
    parser.add_argument(
        "--vllm", choices=("auto", "on", "off"), default="auto", help="the vLLM backend too (auto: where installed)"
    )
    args, device = parse_bench_args(parser, argv)
    on_gpu = device.type == "cuda"
    if on_gpu:  # same records need the same argmax: no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    shape = SHAPES[args.shape or ("qwen0.5b" if on_gpu else "tiny")]
    tokenizer = stop_tokenizer()
    stop_id = tokenizer.convert_tokens_to_ids(STOP)
    models = []
    for seed in (0, 1):
        model = random_lm(dict(shape, tie=False), len(tokenizer), torch.float32, device, seed)
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)  # random small models are near-uniform: sharpen them
            model.lm_head.weight[stop_id] *= 1.5  # and make steps end
        models.append(model)
    student, teacher = models
    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    questions = [
        Question(i, "".join(letters[j] for j in torch.randint(0, 26, (12,), generator=g).tolist()))
        for i in range(args.questions)
    ]
    greedy = SamplingConfig(temperature=0.0)
    new_tokens = args.max_new_tokens or (256 if on_gpu else 64)
    base = RolloutConfig(
        mode="step_motab",
        max_new_tokens=new_tokens,
        max_step_tokens=new_tokens,
        min_correction_tokens=new_tokens // 4,
        draft_len=8,
        step_stop=STOP,
        student_sampling=greedy,
        teacher_sampling=greedy,
        monitor=MonitorConfig(epsilon0=1e-30),
    )
    options = SynthesisOptions(responses=1, batch_size=len(questions))

    def ours(config):
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "records.jsonl"
            synthesize(student, teacher, tokenizer, questions, out, config, options, progress=False)
            return [json.loads(line) for line in out.read_text().splitlines()]

    scout = ours(base)
    values = sorted(s["oracle_value"] for r in scout for s in r["steps"] if s["oracle_value"] is not None)
    epsilon0 = values[len(values) // 2]
    config = RolloutConfig(**{**base.__dict__, "monitor": MonitorConfig(epsilon0=epsilon0, theta=1.0)})
    print(f"# {len(values)} steps in the scouting run; ε0 = their median V = {epsilon0:.3g}", flush=True)

    prompts = [tokenizer(q.text)["input_ids"] for q in questions]
    load_before = machine_load()

    def engine_run():
        return ours(config)

    def scripts_run():
        return [scripts_loop(student, teacher, tokenizer, p, config) for p in prompts]

    # the counted runs are each way's warm-up: the timed runs follow them at once
    records, ours_reads = counted(engine_run, student, teacher)
    ours_seconds = run_seconds(engine_run, device, args.repeats, warmup=0)
    theirs, their_reads = counted(scripts_run, student, teacher)
    scripts_seconds = run_seconds(scripts_run, device, args.repeats, warmup=0)
    on_vllm = None
    if args.vllm == "on" or (args.vllm == "auto" and importlib.util.find_spec("vllm") is not None):
        on_vllm = vllm_way(student, teacher, tokenizer, questions, config, args.repeats, on_gpu)
    load_after = machine_load()

    agree = 0
    for mine, other in zip(records, theirs):
        same = (mine["output"], mine["breach"], mine["root_cause"]) == (
            other["output"],
            other["breach"],
            other["root_cause"],
        )
        mine_values = [s["oracle_value"] for s in mine["steps"]]
        same = same and all(
            (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-3))
            for a, b in zip(mine_values, other["values"])
        )
        agree += same
    tokens = sum(r["tokens"] for r in records)
    committed = tokens + sum(len(p) for p in prompts)  # what each cache must hold at the end
    steps = sum(len(r["steps"]) for r in records)
    assert steps == sum(t["steps"] for t in theirs) or agree < len(records)

    def work(reads: DecoderReads) -> dict:
        return {
            f"{name}_{what}": value
            for name in ("student", "teacher")
            for what, value in (
                ("tokens_per_committed", reads.tokens[name] / committed),
                ("forwards_per_step", reads.forwards[name] / steps),
            )
        }

    def spread(seconds: list[float]) -> dict:
        return dict(median=statistics.median(seconds), min=min(seconds), max=max(seconds))

    engine, scripts = spread(ours_seconds), spread(scripts_seconds)
    vllm_result = None
    if on_vllm is not None:
        vllm_records, vllm_seconds, teacher_work = on_vllm
        vllm_result = dict(
            seconds=spread(vllm_seconds),
            records_agree=sum(
                (a["output"], a["breach"], a["root_cause"]) == (b["output"], b["breach"], b["root_cause"])
                for a, b in zip(records, vllm_records)
            ),
            teacher_tokens_per_committed=teacher_work["computed"] / committed,
            teacher_prompt_tokens_per_committed=teacher_work["prompt"] / committed,
            teacher_prefill_share_cached=teacher_work["cached"] / max(teacher_work["prompt"], 1),
            rescored_requests=teacher_work["rescored"],
            scoring_requests=teacher_work["requests"],
        )
    result = run_facts(
        device,
        shape=shape,
        questions=len(questions),
        max_new_tokens=new_tokens,
        epsilon0=epsilon0,
        breach_rate=sum(r["breach"] for r in records) / len(records),
        records_agree=agree,
        committed_tokens=committed,
        steps=steps,
        engine=work(ours_reads),
        scripts=work(their_reads),
        repeats=args.repeats,
        engine_seconds=engine,
        scripts_seconds=scripts,
        speedup_of_medians=scripts["median"] / engine["median"],
        load_before=load_before,
        load_after=load_after,
        vllm=vllm_result,
    )
    name = args.shape or ("qwen0.5b" if on_gpu else "tiny")
    per_model = (
        "| way | student tokens read / committed | teacher tokens read / committed | student forwards / step | "
        "teacher forwards / step |\n|---|---|---|---|---|\n"
    )
    for way, reads in (("engine", result["engine"]), ("scripts' loop", result["scripts"])):
        per_model += (
            f"| {way} | {reads['student_tokens_per_committed']:.2f} | {reads['teacher_tokens_per_committed']:.2f} | "
            f"{reads['student_forwards_per_step']:.2f} | {reads['teacher_forwards_per_step']:.2f} |\n"
        )

    def seconds(s: dict) -> str:
        return f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})"

    table = (
        f"{result['card']}, {name}, {len(records)} records ({agree} agree), {steps} steps, breach rate "
        f"{result['breach_rate']:.0%}, {committed} committed tokens\n\n{per_model}\n"
        f"| card | engine s, median (min–max) | scripts' loop s, median (min–max) | ratio of medians | repeats | "
        f"load before / after (1 min) |\n|---|---|---|---|---|---|\n"
        f"| {result['card']} | {seconds(engine)} | {seconds(scripts)} | {result['speedup_of_medians']:.1f}× | "
        f"{args.repeats} | {load_before['load_1min']:.2f} / {load_after['load_1min']:.2f} |"
    )
    if vllm_result is not None:
        v = vllm_result
        table += (
            f"\n\nvLLM backend ({v['records_agree']} of {len(records)} records agree with the engine's): "
            f"{seconds(v['seconds'])} s, {engine['median'] / v['seconds']['median']:.2f}× the engine's speed; the "
            f"teacher computed {v['teacher_tokens_per_committed']:.2f} tokens per committed token (prefilled or "
            f"written), of {v['teacher_prompt_tokens_per_committed']:.2f} prompt tokens sent per committed token "
            f"({v['teacher_prefill_share_cached']:.0%} read from its prefix cache; {v['rescored_requests']} of "
            f"{v['scoring_requests']} scoring requests sent again without it)"
        )
    print(table)
    write_results(args.out, "synthesis", result, table)


def vllm_way(student, teacher, tokenizer, questions, config, repeats: int, on_gpu: bool):
    """The records of the vLLM backend on the same models (saved to a folder), its seconds per run,
    and its teacher's work per run: prompt tokens sent, read from the prefix cache, computed
    (prefilled + written), scoring requests and those sent again without the cache."""
    from motab.backends.vllm import VLLMSteps, load_engines
    from motab.config import BackendOptions
    from motab.engine.step import StepRollout
    from motab.policy import resolve
    from motab.synthesis import record_of

    folder = tempfile.mkdtemp()
    paths = []
    for role, model in (("student", student), ("teacher", teacher)):
        model.config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(Path(folder) / role)
        tokenizer.save_pretrained(Path(folder) / role)
        paths.append(str(Path(folder) / role))
    settled, policy = resolve(config, tokenizer)
    engines = load_engines(*paths, BackendOptions(name="vllm", enforce_eager=not on_gpu), settled, "float32")
    prompts = [tokenizer(q.text)["input_ids"] for q in questions]
    work = {}

    def run():
        for engine in engines:  # each run from a cold prefix cache, as the engine's from empty caches
            engine.reset_prefix_cache()
        backend = VLLMSteps(*engines, settled, policy, tokenizer)
        trajectories = StepRollout(backend, settled, policy, tokenizer).run(prompts, list(range(len(prompts))))
        counters = backend.counters
        written = sum(s == "teacher" for t in trajectories for s in t.sources)
        work.update(
            prompt=counters["teacher_prompt_tokens"],
            cached=counters["teacher_cached_tokens"],
            computed=counters["teacher_prompt_tokens"] - counters["teacher_cached_tokens"] + written,
            requests=counters["scoring_requests"],
            rescored=counters["rescored"],
        )
        return [record_of(q, 0, q.text, t, tokenizer, settled, "However,") for q, t in zip(questions, trajectories)]

    records = run()  # the warm-up, and the counted run
    counted_work = dict(work)
    seconds = run_seconds(run, torch.device("cpu"), repeats, warmup=0)
    return records, seconds, counted_work


if __name__ == "__main__":
    main()
