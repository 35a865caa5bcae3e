"""Device, interpreter and dtype policy shared by every op in motab_kernels."""

from __future__ import annotations

import functools
import os

import torch


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


@functools.cache
def _mixed_precision_gemm_supported(device_type: str) -> bool:
    # aten::mm.dtype / addmm.dtype (fp16/bf16 operands, fp32 result) exist in recent torch builds,
    # but only some backends implement them; ask once per device type instead of guessing by version.
    if device_type != "cuda":
        return False
    try:
        a = torch.ones(16, 16, device=device_type, dtype=torch.bfloat16)
        torch.mm(a, a, out_dtype=torch.float32)
        acc = torch.zeros(16, 16, device=device_type, dtype=torch.float32)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def matmul_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result (fp64 for fp64 operands), accumulated at that precision.

    Half-precision operands use the mixed-precision GEMM where the backend has it (no rounding of
    the product to 16 bits); elsewhere the product is rounded to the operands' dtype first, exactly
    as a plain PyTorch ``(a @ b).float()`` would be.
    """
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if _mixed_precision_gemm_supported(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def addmm_wide_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 (or fp64) accumulator and operands of any float dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.dtype == torch.float32 and _mixed_precision_gemm_supported(a.device.type):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_((a @ b).to(acc.dtype))


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
