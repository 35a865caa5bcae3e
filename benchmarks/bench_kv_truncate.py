"""Backtracking cost: truncating rows of a KV cache, paged (in place) vs the naive ways.

For R rows holding C tokens each, every row is cut back by a different count in [1, 16]:

- ``paged``: ``PagedKVCache.truncate`` — one launch, whole blocks back to the free stack, no K/V
  byte moved. Timed on the host (call → device idle) and, on a GPU, with CUDA events.
- ``repad``: a contiguous ``[R, C, H, D]`` cache per layer (HF-style); ragged crops need a fresh
  left-padded copy of every row: the usual way to keep a batch aligned after per-row crops.
- ``uniform crop``: HF ``DynamicCache.crop``-style slicing to one common length (cheap, but it
  cannot express per-row lengths: shown for scale only).

The claim to check: the paged cost does not depend on the context length or the K/V size.
Writes ``kv_truncate.json`` and ``kv_truncate.md`` under ``--out``.
"""

from __future__ import annotations

import statistics
import time
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


def kv_bytes_per_token(model) -> int:
    return 2 * model["layers"] * model["kv_heads"] * model["head_dim"] * torch.finfo(model["dtype"]).bits // 8


def cuts(rows: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 17, (rows,), generator=g).tolist()


def time_paged(rows, context, model, device, reps):
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
    cache.reserve(row_ids, [context] * rows)
    new_lens = [context - c for c in cuts(rows)]
    cache.truncate(row_ids, new_lens)  # warm-up at the timed size (kernel compilation), untimed
    cache.reserve(row_ids, [context - n for n in new_lens])
    host, events = [], []
    for _ in range(reps):
        sync(device)
        start_event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        end_event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        t0 = time.perf_counter()
        if start_event:
            start_event.record()
        cache.truncate(row_ids, new_lens)
        if end_event:
            end_event.record()
        sync(device)
        host.append(time.perf_counter() - t0)
        if start_event:
            events.append(start_event.elapsed_time(end_event) / 1e3)
        cache.reserve(row_ids, [context - n for n in new_lens])  # restore, untimed
    return statistics.median(host), (statistics.median(events) if events else None)


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
    parser.add_argument("--reps", type=int, default=20)
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
    meta = run_facts(device, kv_bytes_per_token=per_token)
    markdown = f"bench_kv_truncate on {card}, {meta['date']}\n\n" + "\n".join(lines)
    write_results(args.out, "kv_truncate", dict(meta=meta, rows=results), markdown)


def fmt(value, missing="—"):
    return missing if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
