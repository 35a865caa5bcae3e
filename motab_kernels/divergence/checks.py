"""Input checks of the fused divergence: every option and tensor is validated here, before anything
runs, and turned into a ``Call`` (the settings that decide the math and the per-row tensors the
passes need). Errors name the argument and what was expected."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from motab_kernels import ragged
from motab_kernels._runtime import triton_usable_on

KINDS = ("fkl", "rkl", "jsd")
IMPLS = ("auto", "triton", "chunked", "reference")
REDUCTIONS = ("none", "sum", "mean")


@dataclass(frozen=True)
class LogitTransform:
    """How raw LM-head outputs become the logits a softmax sees: ``cap·tanh(scale·x / cap) / T``.

    ``scale`` multiplies first (Granite-style logit scaling), then the optional soft-cap
    (Gemma-style ``final_logit_softcapping``), then the temperature divides.
    """

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits if self.scale == 1.0 else logits * self.scale
        if self.softcap is not None:
            x = self.softcap * torch.tanh(x / self.softcap)
        return x if self.temperature == 1.0 else x / self.temperature

    def slope(self, logits: torch.Tensor) -> torch.Tensor | float:
        """d apply(x) / dx, elementwise (a number when it does not depend on x)."""
        factor = self.scale / self.temperature
        if self.softcap is None:
            return factor
        return factor * (1.0 - torch.tanh(logits * (self.scale / self.softcap)).square())


@dataclass(frozen=True)
class Settings:
    """Everything besides tensors that decides the math of a call."""

    kind: str  # "fkl", "rkl" or "jsd"; "jsd" only with 0 < beta < 1
    beta: float
    student: LogitTransform
    teacher: LogitTransform


@dataclass(frozen=True)
class DivergenceOptions:
    """The settings of a divergence call that are not per-row data, and the one place their
    defaults live: ``fused_linear_divergence``, ``logit_divergence`` and ``FusedLinearDivergence``
    take each as a keyword whose default is read from ``DEFAULTS`` below, and build one of these
    from their keywords in field order (``prepare_call`` checks it). ``tests/kernels/test_divergence.py``
    checks that their signatures name exactly these fields with these defaults, and that the
    module's takes them in this order."""

    kind: str = "jsd"
    beta: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    logit_scale: float | tuple[float, float] = 1.0
    softcap: float | tuple[float | None, float | None] | None = None
    impl: str = "auto"
    chunk_size: int | None = None


DEFAULTS = DivergenceOptions()


@dataclass(frozen=True)
class RowInputs:
    """The per-row inputs of a divergence call, as given to the public functions' keywords of the
    same names (documented there); ``prepare_call`` checks them against the rows."""

    target: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    normalizer: float | torch.Tensor | None = None
    threshold: float | torch.Tensor | None = None
    seq_len: int | torch.Tensor | list[int] | None = None
    cu_seqlens: torch.Tensor | list[int] | None = None


@dataclass
class Call:
    """A validated call: settings, the impl chosen and the per-row tensors the passes need."""

    settings: Settings
    impl: str  # "triton", "chunked" or "reference"
    chunk_size: int | None
    stats_dtype: torch.dtype  # fp32, or fp64 for fp64 inputs
    target: torch.Tensor | None  # [N] int64 with ignored rows clamped to id 0
    valid: torch.Tensor  # [N] bool
    row_weight: torch.Tensor  # [N] factor of each row's divergence in the loss
    reduce: bool
    threshold: float | torch.Tensor | None
    cu_seqlens: torch.Tensor | None  # [B + 1] groups of rows for first_stray


def prepare_call(
    options: DivergenceOptions,
    rows: RowInputs,
    lead_shape: torch.Size,
    vocab: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Call:
    """Checks ``options`` and the per-row inputs ``rows`` of a call for inputs of ``lead_shape`` rows
    over ``vocab`` entries computed in ``dtype``."""
    target, weights, normalizer = rows.target, rows.weights, rows.normalizer
    threshold, seq_len, cu_seqlens = rows.threshold, rows.seq_len, rows.cu_seqlens
    n = math.prod(lead_shape)
    settings = checked_settings(options.kind, options.beta, options.temperature, options.logit_scale, options.softcap)
    if options.reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {options.reduction!r}; expected one of {REDUCTIONS}")
    if normalizer is not None and options.reduction != "mean":
        raise ValueError(
            "normalizer replaces the denominator of reduction='mean'; it means nothing with "
            f"reduction={options.reduction!r}"
        )
    impl = _resolve_impl(options.impl, device)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if impl == "triton" and stats_dtype == torch.float64:
        raise TypeError(f"impl={impl!r} computes in float32; use impl='chunked' or 'reference' for float64 inputs")
    if target is None:
        valid = torch.ones(n, dtype=torch.bool, device=device)
    else:
        target = _checked_target(target, lead_shape, vocab, options.ignore_index, device).reshape(n)
        valid = target != options.ignore_index
        target = torch.where(valid, target, 0)
    row_weight = valid.to(stats_dtype)
    if weights is not None:
        row_weight = row_weight * _checked_row_vector(weights, "weights", n, device).to(stats_dtype)
    if options.reduction == "mean":
        denominator = valid.sum().clamp_min(1) if normalizer is None else torch.as_tensor(normalizer, device=device)
        row_weight = row_weight / denominator.to(stats_dtype)
    if threshold is not None and not isinstance(threshold, (int, float)):
        threshold = _checked_row_vector(threshold, "threshold", n, device)
    offsets = checked_groups(seq_len, cu_seqlens, n, device)
    if offsets is not None and threshold is None:
        raise ValueError("seq_len / cu_seqlens group rows for first_stray, which needs a threshold")
    reduce = options.reduction != "none"
    return Call(settings, impl, options.chunk_size, stats_dtype, target, valid, row_weight, reduce, threshold, offsets)


def checked_settings(kind, beta, temperature, logit_scale, softcap) -> Settings:
    """The math of a call; "jsd" at β = 0 or 1 becomes forward / reverse KL, as in TRL."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "fkl" if beta == 0.0 else "rkl"
    scales = _pair(logit_scale, "logit_scale")
    caps = _pair(softcap, "softcap")
    for value in scales:
        if not (value is not None and value > 0 and math.isfinite(value)):
            raise ValueError(f"logit_scale must be positive and finite, got {logit_scale}")
    for value in caps:
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"softcap must be positive and finite (or None), got {softcap}")
    student, teacher = (LogitTransform(sc, cap, temperature) for sc, cap in zip(scales, caps))
    return Settings(kind, beta, student, teacher)


def _pair(value, name):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} takes one value or a (student, teacher) pair, got {value!r}")
        return tuple(None if v is None else float(v) for v in value)
    return (None if value is None else float(value),) * 2


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "fused_monitor":
        raise ValueError(
            "impl='fused_monitor' is no longer part of motab_kernels (it lost to the buffered pass wherever it "
            f"was measured; benchmarks/fused_monitor.py keeps it for the comparison); expected one of {IMPLS}"
        )
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    if impl == "triton" and not triton_usable_on(device):
        raise ValueError(
            f"impl={impl!r} needs CUDA tensors (got {device.type}); on CPU it runs only under the Triton "
            "interpreter (TRITON_INTERPRET=1), which is meant for tests"
        )
    return impl


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_same_device(named: dict[str, torch.Tensor | None]) -> None:
    devices = {name: x.device for name, x in named.items() if x is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(
            "all tensors must be on one device, got " + ", ".join(f"{k} on {v}" for k, v in devices.items())
        )


def check_linear_inputs(hs, ws, ht, wt, bs, bt) -> None:
    """Hidden states, LM heads and biases of ``fused_linear_divergence`` fit together."""
    named = dict(student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt)
    for name, x in named.items():
        _check_float(x, name)
    for w, name in ((ws, "student_weight"), (wt, "teacher_weight")):
        if w.dim() != 2:
            raise ValueError(f"{name} must be [vocab, hidden], got shape {tuple(w.shape)}")
    for h, w, who in ((hs, ws, "student"), (ht, wt, "teacher")):
        if h.dim() < 1 or h.shape[-1] != w.shape[1]:
            raise ValueError(
                f"{who}_hidden has hidden size {h.shape[-1] if h.dim() else None} (shape {tuple(h.shape)}) but "
                f"{who}_weight is {tuple(w.shape)}: the last dimension of the hidden states must equal the weight's"
            )
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"student and teacher rows differ: student_hidden {tuple(hs.shape)} vs teacher_hidden {tuple(ht.shape)}"
        )
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"vocabulary mismatch: student LM head has {ws.shape[0]} entries, teacher {wt.shape[0]}; "
            "distillation needs one shared vocabulary"
        )
    for b, name in ((bs, "student_bias"), (bt, "teacher_bias")):
        if b is not None:
            _check_float(b, name)
            if tuple(b.shape) != (ws.shape[0],):
                raise ValueError(f"{name} must be [{ws.shape[0]}] (one per vocabulary entry), got {tuple(b.shape)}")
    _check_same_device(named | dict(student_bias=bs, teacher_bias=bt))


def check_logit_inputs(s: torch.Tensor, t: torch.Tensor) -> None:
    """Student and teacher logits of ``logit_divergence`` fit together."""
    _check_float(s, "student_logits")
    _check_float(t, "teacher_logits")
    if s.dim() < 1 or s.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"student and teacher rows differ: {tuple(s.shape)} vs {tuple(t.shape)}")
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"vocabulary mismatch: student logits have {s.shape[-1]} entries, teacher {t.shape[-1]}")
    _check_same_device({"student_logits": s, "teacher_logits": t})


def _checked_target(target, lead_shape, vocab, ignore_index, device) -> torch.Tensor:
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of token ids, got {getattr(target, 'dtype', type(target))}")
    # a target on the host is checked there and copied over once (checking a device copy makes the
    # host wait for the device: the rollout engine passes its drafts' ids from the host)
    if target.device != device and target.device.type != "cpu":
        raise ValueError(f"target is on {target.device} but the inputs are on {device}")
    if target.shape != lead_shape and target.shape != (math.prod(lead_shape),):
        raise ValueError(f"target has shape {tuple(target.shape)}, expected {tuple(lead_shape)} (one id per row)")
    target = target.long()
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"target holds id {int(target[bad][0])} outside the vocabulary [0, {vocab}) and is not "
            f"ignore_index={ignore_index}"
        )
    return target.to(device, non_blocking=True)


def _checked_row_vector(x, name: str, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of {n} values or a number, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.numel() != n:
        raise ValueError(f"{name} must have one value per row ({n}), got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")
    return x.reshape(n)


def checked_groups(seq_len, cu_seqlens, n: int, device: torch.device) -> torch.Tensor | None:
    """The grouping of ``n`` rows into sequences as ``[B + 1]`` int64 offsets on ``device`` (None
    when neither form is given). ``seq_len`` is the shorthand: an int k (every sequence k rows) or
    B lengths."""
    if seq_len is None and cu_seqlens is None:
        return None
    if seq_len is not None and cu_seqlens is not None:
        raise ValueError("give seq_len or cu_seqlens, not both: they describe the same grouping")
    if isinstance(seq_len, int):
        if seq_len <= 0 or n % seq_len:
            raise ValueError(f"seq_len={seq_len} must be a positive divisor of the number of rows ({n})")
        return torch.arange(0, n + 1, seq_len, device=device)
    if seq_len is not None:
        lengths = torch.as_tensor(seq_len)
        if lengths.dim() != 1 or lengths.is_floating_point() or bool((lengths < 0).any()) or int(lengths.sum()) != n:
            raise ValueError(f"seq_len lengths must be non-negative integers summing to the number of rows ({n})")
        return ragged.cu_seqlens(lengths.to(device))
    offsets = torch.as_tensor(cu_seqlens)
    if (
        offsets.dim() != 1
        or offsets.is_floating_point()
        or len(offsets) < 1
        or int(offsets[0]) != 0
        or int(offsets[-1]) != n
        or bool((ragged.seq_lengths(offsets) < 0).any())
    ):
        raise ValueError(
            f"cu_seqlens must be non-decreasing integer offsets from 0 to the number of rows ({n}), "
            f"got {offsets.tolist()}"
        )
    return offsets.to(device=device, dtype=torch.int64)
