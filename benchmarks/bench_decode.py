"""Decode throughput on the paged cache vs HF ``generate``, and the decode attention's bandwidth.

Same random model for both (Qwen2.5-1.5B-shaped in bf16 on a GPU, a tiny one on a CPU), greedy,
equal-length random prompts (no padding), EOS off, batch 1 / 16 / 64. Tokens per second count
generated tokens over the whole call, prefill included, for both. ``generate`` is timed on the
model before PagedModel wraps it (``--attention-only`` skips this part).

Then the attention alone at decode (one new token per row, Qwen2.5-1.5B's 12 query / 2 K/V heads
× 128 dims in bf16), 64 rows × 8k and 8 rows × 32k context: µs per layer call, K/V bytes read per
call, GB/s and the share of the card's measured copy bandwidth (``_timing.copy_bandwidth``) for
the whole-context route (``split="off"``), the automatic choice (what the model runs) and fixed
chunk lengths (``--chunks``), with the issue's ≥ 70 % target marked met or missed for the
automatic route. On a CPU the same routes run tiny shapes in the Triton interpreter: a check that
the benchmark runs, not a GPU number. Writes ``decode.json`` and ``decode.md`` under ``--out``.
"""

from __future__ import annotations

import os
from datetime import date

import torch

# Off a GPU the Triton routes run in the interpreter; it is read when triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _common import bench_parser, card_name, parse_bench_args, run_facts, write_results  # noqa: E402
from _models import QWEN2_5_1_5B, QWEN_VOCAB, TINY_STUDENT, random_lm  # noqa: E402
from _timing import copy_bandwidth, median_seconds  # noqa: E402

from motab.models import PagedModel, greedy_decode  # noqa: E402
from motab.tiny import tiny_config  # noqa: E402
from motab_kernels import PagedKVCache, QueryLayout, paged_attention  # noqa: E402
from motab_kernels.paged_attention import plan_splits  # noqa: E402


def decode_rows(model, batches, prompt_len, new_tokens, device, reps):
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = {b: torch.randint(0, vocab, (b, prompt_len), generator=g).to(device) for b in batches}
    hf = {}
    for b in batches:
        run = lambda b=b: model.generate(
            prompts[b],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        run()  # warm-up
        hf[b] = median_seconds(run, device, reps, warmup=0)
    paged = PagedModel(model, max_rows=max(batches), max_tokens=max(batches) * (prompt_len + new_tokens))
    rows = []
    for b in batches:
        lists = prompts[b].tolist()
        run = lambda lists=lists: greedy_decode(paged, lists, new_tokens)
        run()  # warm-up (and Triton compilation)
        ours = median_seconds(run, device, reps, warmup=0)
        rows.append(
            dict(
                batch=b,
                prompt=prompt_len,
                new_tokens=new_tokens,
                hf_tok_s=b * new_tokens / hf[b],
                paged_tok_s=b * new_tokens / ours,
                speedup=hf[b] / ours,
            )
        )
        print(
            f"| {b} | {prompt_len} | {new_tokens} | {rows[-1]['hf_tok_s']:.1f} | {rows[-1]['paged_tok_s']:.1f} | "
            f"{rows[-1]['speedup']:.2f} |",
            flush=True,
        )
    return rows


# Decode attention shapes of issue 12 (rows × context): a wide batch and the paper's 32k trajectories.
GPU_ATTENTION_SHAPES = ((64, 8192), (8, 32768))
# Tiny ones for the CPU interpreter: the same routes, only their plumbing is checked.
CPU_ATTENTION_SHAPES = ((4, 512), (2, 1024))
# Decode attention must read the cache at this share of the measured copy bandwidth (issue 12).
BANDWIDTH_TARGET = 0.70
# Back-to-back calls per timed repetition: the host enqueues them while the GPU runs, so the
# median is the kernels' time rather than Python's launch overhead.
CALLS_PER_REP = 20


def decode_cache(config, rows, context, dtype, device):
    """A one-layer paged cache of ``rows`` rows holding ``context`` random tokens each, and the
    layout of one new token per row at position ``context − 1`` (already in the cache)."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    cache = PagedKVCache(
        1, kv_heads, head_dim, num_blocks=rows * context // 16 + rows, max_rows=rows, dtype=dtype, device=device
    )
    cache.reserve(list(range(rows)), [context] * rows)
    cache.key_cache[0].normal_()
    cache.value_cache[0].normal_()
    layout = QueryLayout.build(list(range(rows)), [context - 1] * rows, range(rows + 1), device)
    query = torch.randn(rows, heads, head_dim, device=device, dtype=dtype)
    return cache, layout, query


def kv_bytes_read(cache: PagedKVCache, rows: int, context: int) -> int:
    """K and V bytes one decode call over ``rows`` rows of ``context`` tokens must read."""
    _, _, kv_heads, head_dim = cache.key_cache[0].shape
    return 2 * rows * context * kv_heads * head_dim * cache.key_cache[0].element_size()


def attention_routes(config, rows, context, dtype, device, reps, chunks, copy):
    """One table row per route of the decode attention at ``rows`` × ``context``: the whole
    context per program, the automatic choice, and each requested chunk length. The split plan is
    made before timing, as a model makes it once per forward for all its layers."""
    cache, layout, query = decode_cache(config, rows, context, dtype, device)
    head_dim = query.shape[-1]
    n_kv_heads, block_size = cache.key_cache[0].shape[2], cache.block_size
    read = kv_bytes_read(cache, rows, context)
    results = []
    for split in ["off", "auto", *chunks]:
        plan = plan_splits(layout, n_kv_heads, block_size, split=split)
        run = lambda split=split: paged_attention(
            query,
            cache.key_cache[0],
            cache.value_cache[0],
            cache.block_table,
            layout,
            scale=head_dim**-0.5,
            impl="triton",
            split=split,
        )
        seconds = seconds_per_call(run, device, reps)
        results.append(
            dict(
                rows=rows,
                context=context,
                split=split,
                chunk=plan.chunk if plan else None,
                programs=(plan.num_chunks if plan else layout.num_tiles) * n_kv_heads,
                us=seconds * 1e6,
                kv_bytes=read,
                Bps=read / seconds,
                copy_share=read / seconds / copy,
            )
        )
        print(attention_line(results[-1]), flush=True)
    return results


def seconds_per_call(fn, device: torch.device, reps: int) -> float:
    """Median seconds of one call, timed over ``CALLS_PER_REP`` back-to-back calls on a GPU (one
    on a CPU, where nothing runs ahead)."""
    calls = CALLS_PER_REP if device.type == "cuda" else 1
    fn()  # compile
    return median_seconds(lambda: [fn() for _ in range(calls)], device, reps) / calls


def attention_line(r: dict) -> str:
    route = "whole context" if r["chunk"] is None else f"split, chunk {r['chunk']}"
    return (
        f"| {r['rows']} × {r['context']} | {r['split']} | {route} | {r['programs']} | {r['us']:.1f} | "
        f"{r['kv_bytes'] / 1e6:.1f} | {r['Bps'] / 1e9:.2f} | {100 * r['copy_share']:.0f}% | "
        f"{'met' if r['copy_share'] >= BANDWIDTH_TARGET else 'missed'} |"
    )


def target_verdicts(results: list[dict], on_gpu: bool) -> list[str]:
    """Per shape: does the route the model takes (``split="auto"``) meet the bandwidth target?"""
    lines = []
    for r in results:
        if r["split"] != "auto":
            continue
        met = "met" if r["copy_share"] >= BANDWIDTH_TARGET else "missed"
        caveat = "" if on_gpu else " (CPU interpreter: not a GPU claim)"
        lines.append(
            f"decode attention {r['rows']} rows × {r['context']}: {100 * r['copy_share']:.0f}% of copy bandwidth, "
            f"target ≥ {100 * BANDWIDTH_TARGET:.0f}% {met}{caveat}"
        )
    return lines


ATTENTION_HEADER = [
    "| rows × context | split | route | programs | µs per call | K/V MB read | GB/s | % of copy "
    f"| ≥ {BANDWIDTH_TARGET:.0%} |",
    "|---|---|---|---|---|---|---|---|---|",
]


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--attention-only", action="store_true", help="skip the end-to-end decode against generate")
    parser.add_argument(
        "--chunks",
        default=None,
        help="comma-separated chunk lengths (keys) timed beside the automatic choice "
        "(default: 512,1024,2048 on a GPU, 256 on a CPU)",
    )
    args, device = parse_bench_args(parser, argv)
    on_gpu = device.type == "cuda"
    shape, dtype = (QWEN2_5_1_5B, torch.bfloat16) if on_gpu else (TINY_STUDENT, torch.float32)
    config = tiny_config(**shape, vocab=QWEN_VOCAB if on_gpu else 1000).to_dict()  # the fields by their HF names
    prompt_len, new_tokens = (128, 128) if on_gpu else (16, 16)
    chunks = args.chunks if args.chunks is not None else ("512,1024,2048" if on_gpu else "256")
    chunks = [int(c) for c in chunks.split(",") if c]
    card = card_name(device)
    print(f"# bench_decode on {card}, {date.today()}, {dtype}, {config['num_hidden_layers']} layers")
    lines = ["| batch | prompt | new tokens | HF generate tok/s | paged tok/s | × |", "|---|---|---|---|---|---|"]
    rows = []
    if not args.attention_only:
        print("\n".join(lines))
        model = random_lm(shape, config["vocab_size"], dtype, device, seed=0)
        rows = decode_rows(model, [1, 16, 64], prompt_len, new_tokens, device, args.reps)
        del model
    copy = copy_bandwidth(device)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    attention_title = (
        f"decode attention alone, {heads} query / {kv_heads} K/V heads × {config['hidden_size'] // heads} dims, "
        f"{dtype}, one layer call; copy bandwidth {copy / 1e9:.1f} GB/s"
        + ("" if on_gpu else " (CPU, Triton interpreter: plumbing only, not a GPU claim)")
    )
    print(f"\n{attention_title}\n" + "\n".join(ATTENTION_HEADER))
    attention = []
    for batch, context in GPU_ATTENTION_SHAPES if on_gpu else CPU_ATTENTION_SHAPES:
        attention += attention_routes(config, batch, context, dtype, device, max(args.reps, 10), chunks, copy)
    verdicts = target_verdicts(attention, on_gpu)
    print("\n".join(verdicts))
    meta = run_facts(device, dtype=str(dtype))
    result = dict(meta=meta, rows=rows, attention=attention, copy_Bps=copy, bandwidth_target=BANDWIDTH_TARGET)
    decode_table = lines + [
        f"| {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['hf_tok_s']:.1f} | {r['paged_tok_s']:.1f} | "
        f"{r['speedup']:.2f} |"
        for r in rows
    ]
    attention_table = [attention_title, "", *ATTENTION_HEADER, *map(attention_line, attention), "", *verdicts]
    write_results(
        args.out,
        "decode",
        result,
        f"bench_decode on {card}, {meta['date']}\n\n"
        + ("\n".join(decode_table) + "\n\n" if rows else "")
        + "\n".join(attention_table),
    )


if __name__ == "__main__":
    main()
