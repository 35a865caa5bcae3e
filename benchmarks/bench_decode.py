"""Decode throughput on the paged cache vs HF ``generate``, and the paged attention's bandwidth.

Same random model for both (Qwen2.5-1.5B-shaped in bf16 on a GPU, a tiny one on a CPU), greedy,
equal-length random prompts (no padding), EOS off, batch 1 / 16 / 64. Tokens per second count
generated tokens over the whole call, prefill included, for both. ``generate`` is timed on the
model before PagedModel wraps it. Then the attention kernel alone at decode, batch 64 × 8k
context (1k on a CPU): K/V bytes read per second against the card's measured copy bandwidth.
Writes ``decode.json`` and ``decode.md`` under ``--out``.
"""

from __future__ import annotations

from datetime import date

import torch
from _common import bench_parser, card_name, parse_bench_args, run_facts, write_results
from _models import QWEN2_5_1_5B, QWEN_VOCAB, TINY_STUDENT, random_lm
from _timing import copy_bandwidth, median_seconds

from motab.models import PagedModel, greedy_decode
from motab_kernels import PagedKVCache, QueryLayout, paged_attention


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


def attention_bandwidth(config, rows, context, dtype, device, reps):
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
    run = lambda: paged_attention(
        query, cache.key_cache[0], cache.value_cache[0], cache.block_table, layout, scale=head_dim**-0.5
    )
    run()
    seconds = median_seconds(run, device, reps)
    read = 2 * rows * context * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    return seconds, read / seconds


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--reps", type=int, default=3)
    args, device = parse_bench_args(parser, argv)
    on_gpu = device.type == "cuda"
    shape, dtype = (QWEN2_5_1_5B, torch.bfloat16) if on_gpu else (TINY_STUDENT, torch.float32)
    config = dict(shape, vocab_size=QWEN_VOCAB if on_gpu else 1000)
    prompt_len, new_tokens, context = (128, 128, 8192) if on_gpu else (16, 16, 1024)
    card = card_name(device)
    model = random_lm(shape, config["vocab_size"], dtype, device, seed=0)
    print(f"# bench_decode on {card}, {date.today()}, {dtype}, {config['num_hidden_layers']} layers")
    lines = ["| batch | prompt | new tokens | HF generate tok/s | paged tok/s | × |", "|---|---|---|---|---|---|"]
    print("\n".join(lines))
    rows = decode_rows(model, [1, 16, 64], prompt_len, new_tokens, device, args.reps)
    seconds, bandwidth = attention_bandwidth(config, 64, context, dtype, device, max(args.reps, 10))
    copy = copy_bandwidth(device)
    share = 100 * bandwidth / copy
    note = (
        f"paged attention, decode, 64 rows × {context} context: {seconds * 1e6:.1f} µs, "
        f"{bandwidth / 1e9:.1f} GB/s = {share:.0f}% of copy bandwidth ({copy / 1e9:.1f} GB/s)"
    )
    print(note)
    meta = run_facts(device, dtype=str(dtype))
    result = dict(meta=meta, rows=rows, attention_s=seconds, attention_Bps=bandwidth, copy_Bps=copy)
    table = lines + [
        f"| {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['hf_tok_s']:.1f} | {r['paged_tok_s']:.1f} | "
        f"{r['speedup']:.2f} |"
        for r in rows
    ]
    write_results(
        args.out, "decode", result, f"bench_decode on {card}, {meta['date']}\n\n" + "\n".join(table) + f"\n\n{note}"
    )


if __name__ == "__main__":
    main()
