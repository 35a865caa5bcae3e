"""Timing helpers shared by the benchmarks: medians with CUDA events on a GPU, a host clock on a CPU."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    return statistics.median(run_seconds(fn, device, reps, warmup))


def run_seconds(fn, device: torch.device, reps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``reps`` runs of ``fn()`` after ``warmup`` runs (a shared CPU's spread is
    part of the result)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 1 GiB device copy, read + write counted."""
    x = torch.empty(1 << 28, device=device, dtype=torch.float32)
    return 2 * x.numel() * x.element_size() / median_seconds(lambda: x.clone(), device, reps=10)
