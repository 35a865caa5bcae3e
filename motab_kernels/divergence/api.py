"""The public functions of the fused divergence and what they return."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from motab_kernels import ragged, reference
from motab_kernels.divergence.autograd import DivergenceFunction, weighted_loss
from motab_kernels.divergence.checks import (
    DEFAULTS,
    Call,
    DivergenceOptions,
    RowInputs,
    check_linear_inputs,
    check_logit_inputs,
    checked_groups,
    prepare_call,
)
from motab_kernels.divergence.passes import HiddenStates, LogitsInMemory, LogitSource
from motab_kernels.divergence.rows import RowStats


@dataclass
class DivergenceOutput:
    """What ``fused_linear_divergence`` and ``logit_divergence`` return, all per row ``i`` of the
    flattened input (``N`` rows).

    Attributes:
        loss: the reduced loss (scalar), or ``[N]`` with ``reduction="none"``; the only
            differentiable output.
        per_token: ``[N]`` divergence of each row, unweighted; 0 for ignored rows.
        teacher_entropy: ``[N]`` entropy of the teacher's (tempered) distribution; NaN for ignored rows.
        student_logprob, teacher_logprob: ``[N]`` log q[target], log p[target]; NaN for ignored
            rows; ``None`` without ``target``.
        teacher_rank: ``[N]`` int32, how many vocabulary entries the teacher scores strictly above
            the target (0 = the teacher's top choice); -1 for ignored rows; ``None`` without target.
        stray: ``[N]`` bool, ``per_token > threshold`` on valid rows (``None`` without threshold).
        first_stray: ``[B]`` int64, per sequence, the index within the sequence of its first stray
            row; a sequence that never strays gets its length, so the value is always the number
            of rows to keep (``None`` without ``seq_len`` / ``cu_seqlens``).
    """

    loss: torch.Tensor
    per_token: torch.Tensor
    teacher_entropy: torch.Tensor
    student_logprob: torch.Tensor | None = None
    teacher_logprob: torch.Tensor | None = None
    teacher_rank: torch.Tensor | None = None
    stray: torch.Tensor | None = None
    first_stray: torch.Tensor | None = None


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kind: str = DEFAULTS.kind,
    beta: float = DEFAULTS.beta,
    temperature: float = DEFAULTS.temperature,
    target: torch.Tensor | None = None,
    ignore_index: int = DEFAULTS.ignore_index,
    reduction: str = DEFAULTS.reduction,
    weights: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    threshold: float | torch.Tensor | None = None,
    seq_len: int | torch.Tensor | list[int] | None = None,
    cu_seqlens: torch.Tensor | list[int] | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_scale: float | tuple[float, float] = DEFAULTS.logit_scale,
    softcap: float | tuple[float | None, float | None] | None = DEFAULTS.softcap,
    impl: str = DEFAULTS.impl,
    chunk_size: int | None = DEFAULTS.chunk_size,
) -> DivergenceOutput:
    """Divergence between teacher and student next-token distributions from hidden states.

    Logits are ``hidden @ weight.T + bias``, then multiplied by ``logit_scale``, soft-capped
    (``cap·tanh(x / cap)``) and divided by ``temperature`` (no T² factor is applied anywhere).
    Scale and cap take one value for both models or a ``(student, teacher)`` pair. The defaults of
    the options that are not per-row data are ``checks.DivergenceOptions``'s (written once, there).

    Args:
        student_hidden: ``[..., Ds]`` final hidden states; row i predicts ``target[i]`` (the
            caller shifts). Leading dimensions are flattened into N rows.
        student_weight: ``[V, Ds]`` student LM head. Gets a gradient, as do hidden and bias.
        teacher_hidden: ``[..., Dt]`` with the same leading shape; treated as a constant.
        teacher_weight: ``[V, Dt]`` teacher LM head; V must equal the student's.
        kind: ``"fkl"`` KL(teacher‖student), ``"rkl"`` KL(student‖teacher) or ``"jsd"``,
            generalized JSD(β) as TRL's GKD computes it (β=0 is fkl, β=1 is rkl).
        beta: JSD weight of the teacher in the mixture, in [0, 1].
        target: ``[...]`` token ids; rows equal to ``ignore_index`` get no loss. Needed for the
            target statistics; ``None`` makes every row valid. On the inputs' device, or on the
            CPU (checked there, then copied: no wait for the device).
        reduction: ``"mean"`` = Σ_valid w_i·d_i / n_valid (n_valid = number of rows whose target
            is not ``ignore_index``, all rows without target; 0 when no row is valid),
            ``"sum"`` = Σ_valid w_i·d_i, ``"none"`` = the ``[N]`` vector w_i·d_i (0 on ignored rows).
        weights: optional ``[N]`` per-row weights w_i (1 by default).
        normalizer: with ``"mean"``, divide by this instead of n_valid (e.g. the number of
            valid tokens over all gradient-accumulation micro-batches).
        threshold: scalar or ``[N]`` boundary; ``stray = per_token > threshold`` on valid rows.
        seq_len: groups consecutive rows into sequences for ``first_stray``: an int k (N = B·k)
            or B lengths summing to N. Needs ``threshold``.
        cu_seqlens: the same grouping as ``B + 1`` offsets ``[0, l_0, l_0 + l_1, …, N]`` (the
            varlen form of flash-attn and FLA, see ``motab_kernels.ragged``); give one or the other.
            Either is checked where it lies: pass it on the host to spare the device a sync.
        impl: ``"triton"`` (CUDA; CPU only under ``TRITON_INTERPRET=1``), ``"chunked"`` (plain
            PyTorch over row chunks), ``"reference"`` (naive, materialises [N, V]) or ``"auto"``
            (triton on CUDA, chunked elsewhere; never a silent fallback).
        chunk_size: rows per chunk; by default as many as fit a 768 MiB scratch budget.

    Dtypes: the matmuls run in the weight's dtype (the hidden state is cast to it), or in the
    autocast dtype when autocast is on for the device, as ``F.linear`` would; logits, softmax
    and accumulators are fp32 (fp64 for fp64 inputs, chunked/reference only). Gradients come back
    in each input's own dtype; the weight gradient is accumulated over chunks in fp32.

    With a reduced loss and a student that requires grad, the gradients are computed during
    this call (nothing is recomputed in backward, which only scales them).
    """
    options = DivergenceOptions(
        kind, beta, temperature, ignore_index, reduction, logit_scale, softcap, impl, chunk_size
    )
    rows = RowInputs(target, weights, normalizer, threshold, seq_len, cu_seqlens)
    hidden = (student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias)
    return _linear_divergence(*hidden, options, rows)


def logit_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = DEFAULTS.kind,
    beta: float = DEFAULTS.beta,
    temperature: float = DEFAULTS.temperature,
    target: torch.Tensor | None = None,
    ignore_index: int = DEFAULTS.ignore_index,
    reduction: str = DEFAULTS.reduction,
    weights: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    threshold: float | torch.Tensor | None = None,
    seq_len: int | torch.Tensor | list[int] | None = None,
    cu_seqlens: torch.Tensor | list[int] | None = None,
    logit_scale: float | tuple[float, float] = DEFAULTS.logit_scale,
    softcap: float | tuple[float | None, float | None] | None = DEFAULTS.softcap,
    impl: str = DEFAULTS.impl,
    chunk_size: int | None = DEFAULTS.chunk_size,
) -> DivergenceOutput:
    """``fused_linear_divergence`` for ``[..., V]`` logits already in memory (the decode path,
    where the student's logits exist anyway for sampling): the same keyword options (but the
    biases) with the same defaults, the same outputs, the same passes; the gradient goes to
    ``student_logits``."""
    check_logit_inputs(student_logits, teacher_logits)
    source = LogitsInMemory.of(student_logits, teacher_logits)
    options = DivergenceOptions(
        kind, beta, temperature, ignore_index, reduction, logit_scale, softcap, impl, chunk_size
    )
    rows = RowInputs(target, weights, normalizer, threshold, seq_len, cu_seqlens)
    return _divergence(source, student_logits.shape[:-1], options, rows)


def first_stray_index(
    stray: torch.Tensor,
    seq_len: int | torch.Tensor | list[int] | None = None,
    *,
    cu_seqlens: torch.Tensor | list[int] | None = None,
) -> torch.Tensor:
    """Per sequence of consecutive rows, the index of its first ``True`` in ``stray``, or the
    sequence's length when it has none (= the number of rows before the first stray). Sequences
    are given as ``seq_len`` (an int k or B lengths) or as ``cu_seqlens`` offsets."""
    offsets = checked_groups(seq_len, cu_seqlens, stray.shape[0], stray.device)
    if offsets is None:
        raise ValueError("first_stray_index needs the sequences: seq_len or cu_seqlens")
    return _first_stray(stray, offsets)


def _first_stray(stray: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    n = stray.shape[0]
    lengths = ragged.seq_lengths(offsets)
    sequence = ragged.sequence_ids(offsets, n)
    candidate = torch.where(stray, ragged.offsets_in_sequence(offsets, sequence), lengths[sequence])
    return lengths.clone().scatter_reduce_(0, sequence, candidate, reduce="amin")


# A way to run a checked call: its loss and its per-row results.
Route = Callable[[LogitSource, Call], tuple[torch.Tensor, RowStats]]


def _linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    options: DivergenceOptions,
    rows: RowInputs,
    route: Route | None = None,
) -> DivergenceOutput:
    """``fused_linear_divergence`` once its keywords are gathered into ``options`` and ``rows`` (as
    ``FusedLinearDivergence`` holds its options); benchmarks/fused_monitor.py passes its kernel as
    the ``route``."""
    check_linear_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias)
    source = HiddenStates.of(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    return _divergence(source, student_hidden.shape[:-1], options, rows, route)


def _divergence(
    source: LogitSource,
    lead_shape: torch.Size,
    options: DivergenceOptions,
    rows: RowInputs,
    route: Route | None = None,
) -> DivergenceOutput:
    """Both public functions, once their tensors fit together: checks the options and the per-row
    inputs of ``lead_shape`` rows into a ``Call``, runs it by ``route`` and returns its outputs.
    Without a ``route``, ``impl`` picks the reference route or the chunk pass; forward-only calls
    (monitoring) take the chunk pass like every other call."""
    call = prepare_call(options, rows, lead_shape, source.vocab, source.device, source.dtype)
    if route is None:
        route = _reference_route if call.impl == "reference" else _chunk_pass
    loss, out = route(source, call)
    return _finish(loss, out, call)


def _wants_grad(source: LogitSource) -> bool:
    """Whether the call must form gradients: autograd is on and a student tensor requires grad."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in source.student_tensors())


def _chunk_pass(source: LogitSource, call: Call) -> tuple[torch.Tensor, RowStats]:
    """The chunk pass over row chunks (``impl`` "triton" or "chunked"), through the autograd Function."""
    pass_options = (call.settings, call.impl, call.chunk_size, call.stats_dtype)
    loss, *stats = DivergenceFunction.apply(
        type(source), pass_options, call.target, call.row_weight, call.reduce, _wants_grad(source), *source.tensors
    )
    return loss, RowStats(*stats)


def _reference_route(source: LogitSource, call: Call) -> tuple[torch.Tensor, RowStats]:
    """The naive way, ``[N, V]`` in memory and autograd for the gradients (``impl="reference"``)."""
    # Ignored rows (padding) may hold garbage; zeroing them keeps NaN out of autograd's sums.
    rows = call.valid[:, None]
    s, t = (torch.where(rows, x.to(call.stats_dtype), 0.0) for x in source.full_logits(call.valid))
    student, teacher = call.settings.student, call.settings.teacher
    s = reference.transformed_logits(s, student.scale, student.softcap, student.temperature)
    t = reference.transformed_logits(t, teacher.scale, teacher.softcap, teacher.temperature)
    div = reference.per_token_divergence(s, t, call.settings.kind, call.settings.beta)
    out = RowStats.empty(s.shape[0], s.device, call.stats_dtype)
    out.fill(div.detach(), reference.monitoring_statistics(s.detach(), t, call.target))
    return weighted_loss(call.row_weight, div, call.reduce), out


def _finish(loss: torch.Tensor, out: RowStats, call: Call) -> DivergenceOutput:
    valid = call.valid
    result = DivergenceOutput(
        loss=loss,
        per_token=torch.where(valid, out.divergence, 0.0),
        teacher_entropy=torch.where(valid, out.teacher_entropy, math.nan),
    )
    if call.target is not None:
        result.student_logprob = torch.where(valid, out.student_logprob, math.nan)
        result.teacher_logprob = torch.where(valid, out.teacher_logprob, math.nan)
        result.teacher_rank = torch.where(valid, out.teacher_rank, -1)
    if call.threshold is not None:
        result.stray = valid & (out.divergence > call.threshold)
        if call.cu_seqlens is not None:
            result.first_stray = _first_stray(result.stray, call.cu_seqlens)
    return result
