"""The one autograd Function of the fused divergence, for every logit source.

loss = Σ_i row_weight_i · div_i (reduced) or the vector row_weight · div (``reduction="none"``).
With a reduced loss the gradients are formed during forward (nothing is recomputed) and backward
only scales them by the incoming scalar; with ``none`` the incoming vector weighs each row, so
backward runs the pass again.
"""

from __future__ import annotations

import torch

from motab_kernels.divergence.passes import divergence_pass

# Arguments of DivergenceFunction.forward before the source's tensors: none gets a gradient.
_LEADING = 6


def weighted_loss(row_weight: torch.Tensor, divergence: torch.Tensor, reduce: bool) -> torch.Tensor:
    """Σ_i w_i·d_i, or the vector w_i·d_i. Rows of weight 0 (ignored rows) contribute exactly 0,
    even when their inputs are garbage (padding) and their divergence is NaN or inf."""
    weighted = torch.where(row_weight != 0, row_weight * divergence, 0.0)
    return weighted.sum() if reduce else weighted


class DivergenceFunction(torch.autograd.Function):
    """Returns the loss, then the per-row results of ``RowStats`` (not differentiable).

    ``source_type(*tensors)`` rebuilds the logit source (``passes.HiddenStates`` or
    ``LogitsInMemory``); ``pass_options`` are ``divergence_pass``'s settings, impl, chunk size and
    stats dtype; ``want_grad`` is decided by the caller (grad mode is off inside forward).
    """

    @staticmethod
    def forward(ctx, source_type, pass_options, target, row_weight, reduce, want_grad, *tensors):
        eager = want_grad and reduce
        out, grads = divergence_pass(source_type(*tensors), target, row_weight if eager else None, *pass_options)
        ctx.source_type, ctx.pass_options, ctx.reduce = source_type, pass_options, reduce
        ctx.dtypes = [None if x is None else x.dtype for x in tensors]
        if eager:
            ctx.save_for_backward(*grads)
        elif want_grad:
            ctx.save_for_backward(target, row_weight, *tensors)
        per_row = out.tensors()
        ctx.mark_non_differentiable(*per_row)
        return (weighted_loss(row_weight, out.divergence, reduce), *per_row)

    @staticmethod
    def backward(ctx, grad_loss, *_per_row):
        if ctx.reduce:
            grads, scale = list(ctx.saved_tensors), grad_loss
        else:
            target, row_weight, *tensors = ctx.saved_tensors
            _, grads = divergence_pass(ctx.source_type(*tensors), target, row_weight * grad_loss, *ctx.pass_options)
            scale = None
        return (None,) * _LEADING + tuple(_finished(g, scale, dtype) for g, dtype in zip(grads, ctx.dtypes))


def _finished(grad: torch.Tensor | None, scale: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """An input's gradient from what the pass formed (fp32 accumulators for weights): cast to the
    input's dtype first, so no second fp32 copy of a weight-sized tensor is ever made, then scaled."""
    if grad is None:
        return None
    if scale is None:
        return grad if grad.dtype == dtype else grad.to(dtype)
    return grad.to(dtype, copy=True).mul_(scale.to(dtype))
