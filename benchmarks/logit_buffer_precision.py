"""Precision of the fused loss with the chunk's logits kept in fp32, bf16 or fp16 (bf16 inputs).

The fused loss writes each chunk's student and teacher logits into a buffer; on a GPU the GEMM
takes bf16 operands and writes fp32 (``torch.mm(..., out_dtype=torch.float32)``). A 16-bit buffer
would halve the bytes per logit (larger chunks, less traffic) at the price of rounding the
logits. This runs on any device (a CPU too, no GPU claim: precision, not time) and emulates the
GPU's GEMM outputs: products of the bf16 operands summed in fp32, then the buffer's rounding.
Relative errors (‖x − ref‖ / ‖ref‖) of the loss, d hidden and d weight against everything in
fp32 from the same bf16 values, for each buffer and for naive PyTorch (bf16 logits, fp32 softmax).

    python benchmarks/logit_buffer_precision.py [--shape N,Ds,Dt,V] [--kind fkl]
"""

from __future__ import annotations

import argparse

import torch

from motab_kernels import fused_linear_divergence
from motab_kernels.divergence import passes

BUFFERS = {
    "fp32": lambda h, w: h.float() @ w.float().t(),  # what the GPU's mixed-precision GEMM writes
    "bf16": lambda h, w: h @ w.t(),  # a bf16 GEMM output, kept in bf16
    "fp16": lambda h, w: (h.float() @ w.float().t()).half(),  # needs a GEMM with an fp16 epilogue
}


def loss_and_grads(inputs, kind: str, buffer: str | None, dtype: torch.dtype) -> list[torch.Tensor]:
    """Loss, d hidden and d weight of the fused loss (chunked rows) with the logits in ``buffer``."""
    hs, ws, ht, wt = (x.to(dtype).clone().requires_grad_(i < 2) for i, x in enumerate(inputs))
    original = passes._chunk_logits
    if buffer is not None:
        passes._chunk_logits = lambda h, w, b: BUFFERS[buffer](h, w)
    try:
        loss = fused_linear_divergence(hs, ws, ht, wt, kind=kind, impl="chunked").loss
        loss.backward()
    finally:
        passes._chunk_logits = original
    return [x.double() for x in (loss.detach(), hs.grad, ws.grad)]


def naive_loss_and_grads(inputs) -> list[torch.Tensor]:
    """TRL's way for fkl: bf16 logits, fp32 log-softmax, autograd."""
    hs, ws, ht, wt = (x.clone().requires_grad_(i < 2) for i, x in enumerate(inputs))
    ls = torch.log_softmax((hs @ ws.t()).float(), -1)
    lt = torch.log_softmax((ht @ wt.t()).float(), -1)
    loss = (lt.exp() * (lt - ls)).sum(-1).mean()
    loss.backward()
    return [x.double() for x in (loss, hs.grad, ws.grad)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="512,256,384,32000", help="N,Ds,Dt,V")
    parser.add_argument("--kind", default="fkl", choices=("fkl", "rkl", "jsd"))
    args = parser.parse_args(argv)
    n, ds, dt, v = map(int, args.shape.split(","))
    torch.manual_seed(0)
    # hidden states of unit scale, heads scaled so that logits spread over a few units
    inputs = [torch.randn(n, ds), torch.randn(v, ds) * 0.08, torch.randn(n, dt), torch.randn(v, dt) * 0.08]
    inputs = [x.bfloat16() for x in inputs]
    reference = loss_and_grads(inputs, args.kind, None, torch.float64)
    print(f"fused {args.kind} at (N, Ds, Dt, V) = ({n}, {ds}, {dt}, {v}), bf16 inputs; relative error vs fp64:")
    print("| logits | loss | d hidden | d weight |\n|---|---|---|---|")
    ways = {
        f"{name} buffer": lambda name=name: loss_and_grads(inputs, args.kind, name, torch.bfloat16) for name in BUFFERS
    }
    if args.kind == "fkl":
        ways["naive PyTorch"] = lambda: naive_loss_and_grads(inputs)
    for name, run in ways.items():
        errors = [((got - ref).norm() / ref.norm()).item() for got, ref in zip(run(), reference)]
        print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")


if __name__ == "__main__":
    main()
