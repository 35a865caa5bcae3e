"""The entry points of a rollout: ``rollout`` (every prompt, continuously batched over the caches'
slots and pages), ``rollout_in_batches`` (the same with a cap on rows in flight and a progress
bar), ``paged_for_rollouts`` (PagedModels with slots and a pool for rollouts) and ``pool_tokens``
(the pool a run gets). They settle the run's settings (``motab.policy.resolve``), check what
they are given, and hand the rows to the driver the mode's policy names."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from motab.backends import paged as paged_backend
from motab.backends import vllm as vllm_backend
from motab.backends.vllm import is_vllm_engine
from motab.config import RolloutConfig
from motab.engine.schedule import (
    SEPARATOR_ROOM,
    KVPoolTooSmall,
    memory_pool_tokens,
    round_tokens,
    tokens_per_row,
    whole_budget_tokens,
)
from motab.engine.step import StepRollout
from motab.engine.token import TokenRounds
from motab.engine.trajectory import Trajectory
from motab.models import PagedModel, kv_bytes_per_token
from motab.policy import resolve
from motab.runs import RowProgress

# RolloutConfig is frozen: one shared default is safe.
DEFAULT_ROLLOUT = RolloutConfig()
# Rows whose whole budget a pool holds where nothing else sizes it (a CPU, no kv_tokens) and the
# rows in flight are not capped: a machine's free memory is not measured on a CPU.
CPU_POOL_ROWS = 32


def rollout(
    student: PagedModel | torch.nn.Module | None,
    teacher: PagedModel | torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: RolloutConfig = DEFAULT_ROLLOUT,
    *,
    seeds: Sequence[int] | None = None,
    tokenizer=None,
    teacher_tokenizer=None,
    timings: dict[str, float] | None = None,
    keep_teacher_hidden: bool = False,
    round_hook: Callable[[str], AbstractContextManager] | None = None,
    max_rows: int | None = None,
    on_finished: Callable[[int, Trajectory], None] | None = None,
) -> list[Trajectory]:
    """Rolls out every prompt (token ids) under ``config``; ``seeds[i]`` (default ``i``) fixes
    row i's sampling, whatever else is in flight. Rows run continuously batched: at most
    ``max_rows`` at once (default: every prompt, or as many as a caller's PagedModels hold), the
    next prompt entering as soon as a row finishes; ``on_finished(i, trajectory)`` hears of each
    row as it finishes. HF models are wrapped in PagedModels whose pools hold ``config.kv_tokens``
    tokens (default: ``kv_memory`` of a GPU's free memory; on a CPU the whole budget of
    ``max_rows`` rows, or of ``CPU_POOL_ROWS`` when uncapped); rows take
    pages as they grow, and when the pool runs dry the last row admitted gives its pages back and
    re-enters later from its committed tokens (the same trajectory). ``tokenizer`` (and the teacher's, to compare) fills
    the vocabulary size, EOS, step delimiters and stop strings; the step modes need it (their
    steps end at a stop string). A ``timings`` dict receives
    seconds per phase (student_decode, teacher_verify, fused_op, monitor, truncation,
    intervention, teacher_decode); measuring synchronises the device, so time throughput without it.
    ``keep_teacher_hidden`` fills ``Trajectory.teacher_hidden`` (the trainer reuses them instead of
    running the teacher again). ``round_hook(kind)``, when given, returns a context manager that
    wraps each round ("draft": the students draft and the teacher verifies; "teacher": the teacher
    writes): ``motab.profiling.RoundWork`` counts each round's device work through it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: pass one seed per prompt")
    if tokenizer is not None and teacher_tokenizer is not None:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    config, policy = resolve(config, tokenizer)
    if student is None and policy.needs_student:
        raise ValueError(f"mode {config.mode!r} needs a student model (only teacher-written modes run without one)")
    if policy.in_steps and tokenizer is None:
        raise ValueError(f"mode {config.mode!r} writes steps up to a stop string: pass the tokenizer")
    seeds = list(range(len(prompts))) if seeds is None else seeds
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be ≥ 1, got {max_rows}")
    if is_vllm_engine(teacher):
        on_vllm = (config, policy, seeds, tokenizer, timings, keep_teacher_hidden, round_hook, max_rows, on_finished)
        return _rollout_on_vllm(student, teacher, prompts, *on_vllm)
    slots = min(max_rows or len(prompts), len(prompts))
    # the pool, where nothing sizes it (a CPU, no kv_tokens): the rows asked for at their whole budget,
    # or, uncapped, CPU_POOL_ROWS of them
    cpu_rows = slots if max_rows else min(slots, CPU_POOL_ROWS)
    teacher_model, student_model = paged_models(teacher, student, slots, cpu_rows, max(map(len, prompts)), config)
    for model in {teacher_model, student_model}:
        _check_row_room(model, prompts, config)
    models = (student_model, teacher_model, config, policy, tokenizer, timings, keep_teacher_hidden, round_hook)
    if not policy.in_steps:
        return TokenRounds(*models, max_rows=max_rows).run(prompts, seeds, on_finished)
    backend = paged_backend.PagedSteps(*models, max_rows=max_rows)
    return StepRollout(backend, config, policy, tokenizer, keep_teacher_hidden).run(prompts, seeds, on_finished)


def paged_models(teacher, student, slots: int, cpu_rows: int, longest_prompt: int, config: RolloutConfig) -> tuple:
    """Teacher and student as PagedModels (a caller's are kept; HF models are wrapped with
    ``slots`` rows, their pools sized together by ``pool_tokens``); without a student the
    teacher's cache stands in, unused."""
    wrap = [m for m in (teacher, student) if m is not None and not isinstance(m, PagedModel)]
    tokens = pool_tokens(wrap, slots, longest_prompt, config, cpu_rows) if wrap else 0
    if tokens:  # a row in flight holds a block at least: more slots than blocks would never fill
        slots = min(slots, max(1, tokens // config.block_size))
    teacher, student = (
        m if m is None or isinstance(m, PagedModel) else paged_for_rollouts(m, slots, longest_prompt, config, tokens)
        for m in (teacher, student)
    )
    return teacher, student or teacher


def pool_tokens(
    models: Sequence[torch.nn.Module],
    rows: int,
    longest_prompt: int,
    config: RolloutConfig,
    cpu_rows: int | None = None,
) -> int:
    """Tokens each model's KV pool holds: ``config.kv_tokens``; else, on a GPU, ``kv_memory`` of the
    memory free now (after the weights) shared by the models' pools by their bytes per token, never
    more than the whole budget of ``rows`` rows; elsewhere the whole budget (and a partial block)
    of ``cpu_rows`` rows (default ``rows``)."""

    if config.kv_tokens:
        return config.kv_tokens
    device = next(models[0].parameters()).device
    if device.type != "cuda":
        return whole_budget_tokens(rows if cpu_rows is None else cpu_rows, longest_prompt, config)
    gc.collect()  # pools of an earlier rollout no longer referenced (graphs hold them in cycles)
    torch.cuda.empty_cache()  # what the caching allocator holds unused is free for the pools
    free, _ = torch.cuda.mem_get_info(device)
    per_token = sum(kv_bytes_per_token(m.config, next(m.parameters()).element_size()) for m in models)
    return min(whole_budget_tokens(rows, longest_prompt, config), memory_pool_tokens(free, per_token, config))


def _rollout_on_vllm(
    student,
    teacher,
    prompts,
    config,
    policy,
    seeds,
    tokenizer,
    timings,
    keep_teacher_hidden,
    round_hook,
    max_rows,
    on_finished,
) -> list[Trajectory]:
    """A step mode on two vLLM engines (``motab.backends.vllm``)."""
    if not policy.in_steps:
        raise ValueError(
            f"mode {config.mode!r} is token-level: it needs the fused op on every drafted token, which only the paged "
            "engine runs; vLLM engines run the step modes"
        )
    if keep_teacher_hidden:
        raise ValueError("keep_teacher_hidden needs the paged engine: vLLM returns no hidden states")
    if student is not None and not is_vllm_engine(student):
        raise ValueError("the teacher is a vLLM engine: pass the student as one too")
    # a row's most tokens: its prompt, the budget, a correction past it and a trimmed step's separator
    need = max(map(len, prompts)) + config.max_new_tokens + config.min_correction_tokens + SEPARATOR_ROOM
    for role, engine in (("student", student), ("teacher", teacher)):
        room = engine.llm_engine.model_config.max_model_len if engine is not None else need
        if room < need:
            raise ValueError(
                f"the {role}'s vLLM engine holds {room} tokens a sequence (max_model_len); this rollout's rows may "
                f"need {need} (the longest prompt, max_new_tokens, a correction past the budget): build it with "
                "a larger max_model_len or lower rollout.max_new_tokens"
            )
    backend = vllm_backend.VLLMSteps(student, teacher, config, policy, tokenizer, timings, round_hook, max_rows)
    return StepRollout(backend, config, policy, tokenizer).run(prompts, seeds, on_finished)


def paged_for_rollouts(
    model: torch.nn.Module, rows: int, longest_prompt: int, config: RolloutConfig, tokens: int | None = None
) -> PagedModel:
    """A PagedModel with ``rows`` slots for rollouts of prompts up to ``longest_prompt`` tokens
    under ``config``, its pool holding ``tokens`` (default: ``pool_tokens`` for this model alone):
    create it once and pass it to every ``rollout`` call."""
    per_row = tokens_per_row(longest_prompt, config)
    tokens = tokens or pool_tokens([model], rows, longest_prompt, config)
    return PagedModel(
        model,
        max_rows=rows,
        pool_blocks=-(-tokens // config.block_size),  # ``tokens``, rounded up to whole blocks
        block_size=config.block_size,
        max_seq_len=per_row + config.block_size,
        decode_graphs="cuda" if config.cuda_graphs else "off",
    )


def rollout_in_batches(
    student: torch.nn.Module | None,
    teacher: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: RolloutConfig,
    *,
    batch_size: int | None,
    seeds: Sequence[int] | None = None,
    tokenizer=None,
    desc: str = "rollout",
    progress: bool | None = None,
    on_finished: Callable[[int, Trajectory], None] | None = None,
) -> list[Trajectory]:
    """``rollout`` of ``prompts`` with at most ``batch_size`` rows in flight (None: as many as the
    pools hold; continuous batching: a prompt enters as soon as a row finishes); ``seeds[i]``
    (default i) fixes prompt i's sampling, so the trajectories are those of one call with every
    prompt in flight. ``progress`` shows a bar of rows done and committed tokens/s on stderr (None:
    only when stderr is a terminal); ``on_finished(i, trajectory)`` hears of each row as it ends."""

    def finished(index: int, trajectory: Trajectory) -> None:
        bar.update(1, len(trajectory.tokens))
        if on_finished is not None:
            on_finished(index, trajectory)

    with RowProgress(len(prompts), desc, progress) as bar:
        return rollout(
            student,
            teacher,
            prompts,
            config,
            seeds=seeds,
            tokenizer=tokenizer,
            max_rows=batch_size,
            on_finished=finished,
        )


def _check_row_room(model: PagedModel, prompts, config: RolloutConfig) -> None:
    """Every prompt's first round must fit the pool alone and a row of the cache: refuse before
    anything starts (a row that outgrows the pool later is refused when it does)."""
    longest = max(map(len, prompts))
    first_round = round_tokens(longest, longest, config)
    if model.blocks_needed([first_round]) > model.cache.num_blocks:
        raise KVPoolTooSmall(
            f"a prompt of {longest} tokens needs {first_round} tokens of KV pool for its first round, but the pool "
            f"holds {model.capacity_tokens}: raise --kv-tokens (rollout.kv_tokens) or shorten the prompt; nothing "
            "was started"
        )
    if first_round > model.cache.max_blocks_per_row * model.cache.block_size:
        raise ValueError(
            f"a prompt of {longest} tokens is longer than a cache row holds "
            f"({model.cache.max_blocks_per_row * model.cache.block_size} tokens): build the PagedModel with a larger "
            "max_seq_len; nothing was started"
        )


def check_same_tokenizer(tokenizer, teacher_tokenizer) -> None:
    """Refuses two tokenizers with different vocabularies, naming both sizes."""
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"student and teacher tokenizers differ (vocabularies of {len(tokenizer)} and {len(teacher_tokenizer)} "
            "tokens): distillation token by token needs one tokenizer"
        )
