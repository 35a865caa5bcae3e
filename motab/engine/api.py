"""The entry points of a rollout: ``rollout`` (one batch of rows on caches sized for it, or on a
caller's PagedModels checked to hold it), ``rollout_in_batches`` (many prompts on caches
allocated once) and ``paged_for_rollouts`` (caches sized for a rollout). They settle the run's
settings (``motab.policy.resolve``), check what they are given, and hand the rows to the driver
the mode's policy names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from motab.backends import paged as paged_backend
from motab.backends import vllm as vllm_backend
from motab.backends.vllm import is_vllm_engine
from motab.config import RolloutConfig
from motab.engine.step import StepRollout
from motab.engine.token import TokenRounds
from motab.engine.trajectory import Trajectory
from motab.models import PagedModel
from motab.policy import policy_of, resolve
from motab.runs import RowProgress
from motab_kernels import OutOfBlocksError

# RolloutConfig is frozen: one shared default is safe.
DEFAULT_ROLLOUT = RolloutConfig()


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
) -> list[Trajectory]:
    """Rolls out every prompt (token ids) under ``config``; ``seeds[i]`` (default ``i``) fixes
    row i's sampling, whatever else is in the batch. HF models are wrapped in PagedModels whose
    caches are sized up front (prompt + max_new_tokens + draft + intervention per row), so a
    rollout cannot run out of cache midway. ``tokenizer`` (and the teacher's, to compare) fills
    the vocabulary size, EOS, step delimiters and stop strings; the step modes need it (their
    steps end at a stop string). A ``timings`` dict receives
    seconds per phase (prefill, student_decode, teacher_verify, fused_op, monitor, truncation,
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
    if is_vllm_engine(teacher):
        return _rollout_on_vllm(
            student, teacher, prompts, config, policy, seeds, tokenizer, timings, keep_teacher_hidden, round_hook
        )
    longest = max(len(p) for p in prompts)
    models = []
    for model in (teacher, student):
        if model is None:  # a teacher-written mode without a student: the teacher's cache stands in, unused
            model = models[0]
        elif not isinstance(model, PagedModel):
            model = paged_for_rollouts(model, len(prompts), longest, config)
        else:
            _check_capacity(model, prompts, _tokens_per_row(0, config))
        models.append(model)
    teacher_model, student_model = models
    models = (student_model, teacher_model, config, policy, tokenizer, timings, keep_teacher_hidden, round_hook)
    if not policy.in_steps:
        return TokenRounds(*models).run(prompts, seeds)
    backend = paged_backend.PagedSteps(*models)
    return StepRollout(backend, config, policy, tokenizer, keep_teacher_hidden).run(prompts, seeds)


def _rollout_on_vllm(
    student, teacher, prompts, config, policy, seeds, tokenizer, timings, keep_teacher_hidden, round_hook
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
    need = max(map(len, prompts)) + config.max_new_tokens + config.min_correction_tokens + _SEPARATOR_ROOM
    for role, engine in (("student", student), ("teacher", teacher)):
        room = engine.llm_engine.model_config.max_model_len if engine is not None else need
        if room < need:
            raise ValueError(
                f"the {role}'s vLLM engine holds {room} tokens a sequence (max_model_len); this rollout's rows may "
                f"need {need} (the longest prompt, max_new_tokens, a correction past the budget): build it with "
                "a larger max_model_len or lower rollout.max_new_tokens"
            )
    backend = vllm_backend.VLLMSteps(student, teacher, config, policy, tokenizer, timings, round_hook)
    return StepRollout(backend, config, policy, tokenizer).run(prompts, seeds)


def _tokens_per_row(prompt_len: int, config: RolloutConfig) -> int:
    """The most tokens a row's cache can hold during a rollout: prompt, response, a draft past
    the committed tokens and an intervention (step modes: a root-cause correction may run
    ``min_correction_tokens`` past the budget, and a trimmed step reads a few separator tokens)."""
    extra = config.min_correction_tokens + _SEPARATOR_ROOM if policy_of(config.mode).in_steps else 0
    return prompt_len + config.max_new_tokens + config.draft_len + config.intervention_len + 1 + extra


# Cache room for the separator a trimmed step appends past the budget ("\n\n" is one or two tokens).
_SEPARATOR_ROOM = 8


def paged_for_rollouts(model: torch.nn.Module, rows: int, longest_prompt: int, config: RolloutConfig) -> PagedModel:
    """A PagedModel whose cache holds ``rows`` rollouts of prompts up to ``longest_prompt`` tokens
    under ``config``: create it once and pass it to every ``rollout`` call that fits."""
    per_row = _tokens_per_row(longest_prompt, config)
    return PagedModel(
        model,
        max_rows=rows,
        max_tokens=per_row * rows,
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
    batch_size: int,
    seeds: Sequence[int] | None = None,
    tokenizer=None,
    desc: str = "rollout",
    progress: bool | None = None,
) -> list[Trajectory]:
    """``rollout`` of ``prompts``, ``batch_size`` rows at a time on caches allocated once (models
    that are not PagedModels yet are wrapped); ``seeds[i]`` (default i) fixes prompt i's sampling,
    so the trajectories are those of one call with every prompt. ``progress`` shows a bar of rows
    done and committed tokens/s on stderr (None: only when stderr is a terminal)."""
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    rows, longest = min(batch_size, len(prompts)), max(map(len, prompts))
    student, teacher = (
        m if m is None or isinstance(m, PagedModel) else paged_for_rollouts(m, rows, longest, config)
        for m in (student, teacher)
    )
    trajectories = []
    with RowProgress(len(prompts), desc, progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = slice(start, start + batch_size)
            done = rollout(student, teacher, prompts[batch], config, seeds=seeds[batch], tokenizer=tokenizer)
            bar.update(len(done), sum(len(t.tokens) for t in done))
            trajectories += done
    return trajectories


def _check_capacity(model: PagedModel, prompts, extra: int) -> None:
    """A caller's PagedModel must hold the whole rollout: refuse before anything starts."""
    if model.max_rows < len(prompts):
        raise ValueError(f"the PagedModel holds {model.max_rows} rows, fewer than the {len(prompts)} prompts")
    need = model.blocks_needed([len(p) + extra for p in prompts])
    free = model.blocks_available(range(len(prompts)))
    if need > free:
        raise OutOfBlocksError(
            f"this rollout may need {need} cache blocks (prompts + max_new_tokens + draft + intervention per row) "
            f"but the PagedModel can free only {free}; nothing was started"
        )


def check_same_tokenizer(tokenizer, teacher_tokenizer) -> None:
    """Refuses two tokenizers with different vocabularies, naming both sizes."""
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"student and teacher tokenizers differ (vocabularies of {len(tokenizer)} and {len(teacher_tokenizer)} "
            "tokens): distillation token by token needs one tokenizer"
        )
