"""Backtracking cost: truncating rows of a KV cache, paged (in place) vs the naive ways.

For R rows holding C tokens each, every row is cut back by a different count in [1, 16]:

- ``paged``: ``PagedKVCache.truncate`` — one plan copy and one launch, whole blocks back to the
  free stack, no K/V byte moved. A chain of truncations, each cutting every row by 1–16 more
  tokens (the chain keeps every call real work: none repeats a length), is timed two ways:

  - host µs: ``perf_counter`` around each call, nothing synchronised inside the timed region
    (a sync there would add the GPU's time to the host's); median over all calls.
  - GPU µs (CUDA only): the stream's time per call while the host is not the bottleneck.
    ``torch.cuda._sleep`` first keeps the GPU busy while the host enqueues the whole chain; CUDA
    events recorded after the sleep and after the last call bracket the calls' copies and
    kernels running back to back; elapsed time / calls is the device cost per call, launch gaps
    on the device included (a decode round pays them too). Events recorded around a single call
    with the GPU idle, as an earlier version did, time the host issuing the call instead. Chosen
    over summing torch.profiler's kernel and memcpy durations, which leaves out those gaps and
    needs CUPTI. A measurement whose sleep ended before the host finished enqueueing is repeated
    with a longer sleep.

- ``repad``: a contiguous ``[R, C, H, D]`` cache per layer (HF-style); ragged crops need a fresh
  left-padded copy of every row: the usual way to keep a batch aligned after per-row crops.
- ``uniform crop``: HF ``DynamicCache.crop``-style slicing to one common length (cheap, but it
  cannot express per-row lengths: shown for scale only).

The claims to check: the paged cost does not depend on the context length or the K/V size, and
256 rows truncate within the targets below. Writes ``kv_truncate.json`` and ``kv_truncate.md``
under ``--out``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from datetime import date

import torch
from _common import bench_parser, card_name, parse_bench_args, run_facts, write_results
from _timing import sync

from motab_kernels import PagedKVCache

# Qwen2.5-1.5B's K/V shape: 28 layers × 2 K/V heads × 128 dims, bf16 → 28 KiB per token.
GPU_MODEL = dict(layers=28, kv_heads=2, head_dim=128, dtype=torch.bfloat16)
CPU_MODEL = dict(layers=4, kv_heads=2, head_dim=64, dtype=torch.float32)
GPU_GRID = [(1, 1024), (1, 131072), (4, 131072), (16, 8192), (64, 8192), (256, 1024), (256, 4096)]
CPU_GRID = [(1, 1024), (16, 1024), (64, 1024), (64, 4096), (256, 256)]
BLOCK_SIZE = 16
# Issue 12, item 5: per truncate call of TARGET_ROWS rows.
TARGET_ROWS, TARGET_GPU_US, TARGET_HOST_US = 256, 20.0, 50.0
# Truncations per timed chain: below the cache's ring of in-flight plans (64), so the host
# never waits for the sleeping GPU while it enqueues them.
CHAIN_CALLS = 48


def kv_bytes_per_token(model) -> int:
    return 2 * model["layers"] * model["kv_heads"] * model["head_dim"] * torch.finfo(model["dtype"]).bits // 8


def cuts(rows: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 17, (rows,), generator=g).tolist()


def truncation_chain(rows: int, context: int) -> list[list[int]]:
    """New lengths of each call of a chain: every call cuts every row by 1–16 more tokens."""
    lengths, chain = [context] * rows, []
    for step in range(min(CHAIN_CALLS, context // 16 - 1)):
        lengths = [n - c for n, c in zip(lengths, cuts(rows, seed=step))]
        chain.append(lengths)
    return chain


def restore(cache: PagedKVCache, row_ids: list[int], context: int) -> None:
    """Grows every row back to ``context`` tokens (untimed)."""
    cache.reserve(row_ids, [context - n for n in cache.lengths(row_ids)])


def host_seconds_per_call(cache: PagedKVCache, row_ids: list[int], chain: list[list[int]]) -> list[float]:
    """``perf_counter`` around each call of the chain; no sync inside the timed region."""
    times = []
    for lengths in chain:
        t0 = time.perf_counter()
        cache.truncate(row_ids, lengths)
        times.append(time.perf_counter() - t0)
    return times


def sleep_cycles_per_second() -> float:
    """Clock cycles ``torch.cuda._sleep`` spins per second on this GPU."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # warm-up
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def gpu_seconds_per_call(cache, row_ids, chain, context: int, host_guess: float, cycles_per_s: float) -> float:
    """Device time per call of the chain, run back to back behind a sleep that outlasts the host's
    enqueueing (see the module docstring). The rows hold ``context`` tokens before and after."""
    sleep = 2 * len(chain) * host_guess + 1e-3
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(int(sleep * cycles_per_s))
        start.record()
        for lengths in chain:
            cache.truncate(row_ids, lengths)
        end.record()
        host_was_ahead = not start.query()  # the sleep still ran when the last call was enqueued
        torch.cuda.synchronize()
        restore(cache, row_ids, context)
        if host_was_ahead:
            return start.elapsed_time(end) / 1e3 / len(chain)
        sleep *= 4


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, torch runs single-threaded inside: the bookkeeping ops are far too small to gain
    from threads, and some (repeat_interleave) open a parallel region at any size, whose thread
    wake-ups on a loaded 2-core machine cost milliseconds and would be all the row measured."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def time_paged(rows, context, model, device, reps):
    """Median host seconds per truncate call and (CUDA) the median over ``reps`` chains of the
    device seconds per call."""
    blocks = rows * -(-context // BLOCK_SIZE)
    cache = PagedKVCache(
        model["layers"],
        model["kv_heads"],
        model["head_dim"],
        num_blocks=blocks,
        block_size=BLOCK_SIZE,
        max_rows=rows,
        dtype=model["dtype"],
        device=device,
    )
    row_ids = list(range(rows))
    chain = truncation_chain(rows, context)
    cache.reserve(row_ids, [context] * rows)
    host_seconds_per_call(cache, row_ids, chain)  # warm-up at the timed size (kernel compilation)
    restore(cache, row_ids, context)
    host = []
    for _ in range(reps):
        sync(device)
        host += host_seconds_per_call(cache, row_ids, chain)
        sync(device)
        restore(cache, row_ids, context)
    if device.type != "cuda":
        return statistics.median(host), None
    cycles_per_s = sleep_cycles_per_second()
    host_guess = statistics.median(host)
    gpu = [gpu_seconds_per_call(cache, row_ids, chain, context, host_guess, cycles_per_s) for _ in range(reps)]
    return statistics.median(host), statistics.median(gpu)


def time_repad(rows, context, model, device, reps):
    """Per layer: gather every row's kept prefix into a fresh left-padded [R, C, H, D] tensor."""
    shape = (rows, context, model["kv_heads"], model["head_dim"])
    layers = [torch.randn(shape, device=device).to(model["dtype"]) for _ in range(2 * model["layers"])]
    new_lens = torch.tensor([context - c for c in cuts(rows)], device=device)
    width = int(new_lens.max())
    # left padding: output position j of row r reads input position j - (width - len_r)
    source = torch.arange(width, device=device)[None, :] - (width - new_lens)[:, None]
    index = source.clamp_min(0)[:, :, None, None].expand(rows, width, *shape[2:])
    keep = (source >= 0)[:, :, None, None]
    for kv in layers:  # warm-up at the timed size, untimed
        torch.where(keep, kv.gather(1, index), 0)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for kv in layers:
            torch.where(keep, kv.gather(1, index), 0)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_uniform_crop(rows, context, model, device, reps):
    layers = [
        torch.empty(rows, model["kv_heads"], context, model["head_dim"], device=device, dtype=model["dtype"])
        for _ in range(2 * model["layers"])
    ]
    new_len = context - 16
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        cropped = [kv[..., :new_len, :] for kv in layers]
        sync(device)
        times.append(time.perf_counter() - t0)
        del cropped
    return statistics.median(times)


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--reps", type=int, default=20, help="timed chains per size (paged), runs (others)")
    args, device = parse_bench_args(parser, argv)
    on_gpu = device.type == "cuda"
    model, grid = (GPU_MODEL, GPU_GRID) if on_gpu else (CPU_MODEL, CPU_GRID)
    card = card_name(device)
    per_token = kv_bytes_per_token(model)
    shape = f"{model['layers']} layers × {model['kv_heads']} heads × {model['head_dim']} dims, {model['dtype']}"
    print(f"# bench_kv_truncate on {card}, {date.today()}; K/V bytes per token: {per_token} ({shape})")
    header = "| rows | context | K/V GiB | paged host µs | paged GPU µs | repad ms | uniform crop µs |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    results = []
    for rows, context in grid:
        gib = rows * context * per_token / 2**30
        with one_cpu_thread(device):
            paged_host, paged_gpu = time_paged(rows, context, model, device, args.reps)
        try:
            repad = time_repad(rows, context, model, device, max(3, args.reps // 5))
        except torch.OutOfMemoryError:
            repad = None  # the dense copy does not fit next to the original
            torch.cuda.empty_cache()
        crop = time_uniform_crop(rows, context, model, device, args.reps)
        r = dict(
            rows=rows,
            context=context,
            kv_gib=gib,
            paged_host_us=paged_host * 1e6,
            paged_gpu_us=None if paged_gpu is None else paged_gpu * 1e6,
            repad_ms=None if repad is None else repad * 1e3,
            uniform_crop_us=crop * 1e6,
        )
        results.append(r)
        lines.append(
            f"| {rows} | {context} | {gib:.2f} | {fmt(r['paged_host_us'])} | {fmt(r['paged_gpu_us'])} | "
            f"{fmt(r['repad_ms'], 'OOM')} | {fmt(r['uniform_crop_us'])} |"
        )
        print(lines[-1], flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
    verdicts = target_verdicts(results, on_gpu)
    print("\n".join(verdicts))
    meta = run_facts(device, kv_bytes_per_token=per_token, chain_calls=CHAIN_CALLS)
    markdown = f"bench_kv_truncate on {card}, {meta['date']}\n\n" + "\n".join(lines + [""] + verdicts)
    write_results(args.out, "kv_truncate", dict(meta=meta, rows=results, targets=verdicts), markdown)


def target_verdicts(results: list[dict], on_gpu: bool) -> list[str]:
    """One line per target and measured size of ``TARGET_ROWS`` rows: met or missed."""
    verdicts = []
    clock = "host" if on_gpu else "CPU only, which also runs the index ops: not a GPU figure"
    for r in results:
        if r["rows"] != TARGET_ROWS:
            continue
        where = f"{TARGET_ROWS} rows, context {r['context']}"
        gpu = "not measured (no GPU)" if r["paged_gpu_us"] is None else verdict(r["paged_gpu_us"], TARGET_GPU_US)
        verdicts.append(f"- GPU ≤ {TARGET_GPU_US:g} µs per truncate ({where}): {gpu}")
        host = verdict(r["paged_host_us"], TARGET_HOST_US)
        verdicts.append(f"- host ≤ {TARGET_HOST_US:g} µs per truncate ({where}, {clock}): {host}")
    return verdicts


def verdict(measured: float, target: float) -> str:
    return f"{'met' if measured <= target else 'missed'} ({measured:.1f} µs)"


def fmt(value, missing="—"):
    return missing if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
