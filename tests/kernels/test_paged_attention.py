"""paged_attention (Triton and PyTorch) against dense attention over each row's own K/V history,
both Triton routes (whole context per program; context split into chunks and merged), and the
host plan that picks the route and cuts the chunks."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from motab_kernels.paged_attention import QueryLayout, paged_attention, plan_splits, tile_key_ranges
from motab_kernels.paged_kv import PagedKVCache
from motab_kernels.ragged import cu_seqlens

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The package exports the function paged_attention under the module's name.
paged_attention_module = importlib.import_module("motab_kernels.paged_attention")


def dense_attention(q, keys, values, positions, scale, window=None):
    """float64 softmax(q·kᵀ)·v of each query over keys[0..pos] (and above pos − window)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,khd->htk", q.double(), k) * scale
    key_pos = torch.arange(keys.shape[0], device=q.device)
    allowed = key_pos[None, :] <= positions[:, None]
    if window is not None:
        allowed &= key_pos[None, :] > positions[:, None] - window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("htk,khd->thd", scores.softmax(-1), v)


def build_case(prior, new, heads, kv_heads, head_dim, dtype, block_size=4, seed=0, num_blocks=64):
    """A cache whose rows hold ``prior[i]`` old tokens plus ``new[i]`` new ones; every pool slot no
    row owns is NaN, so a read past a row's length would poison the output."""
    g = torch.Generator().manual_seed(seed)
    rows = len(prior)
    cache = PagedKVCache(
        1,
        kv_heads,
        head_dim,
        num_blocks=num_blocks,
        block_size=block_size,
        max_rows=rows + 1,
        dtype=dtype,
        device=DEVICE,
    )
    cache.key_cache[0].fill_(float("nan"))
    cache.value_cache[0].fill_(float("nan"))
    history = []
    order = list(range(rows))[::-1]  # rows enter the pool in another order than their ids
    for row in order:
        total = prior[row] + new[row]
        k = torch.randn(total, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
        v = torch.randn(total, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
        cache.write(0, cache.reserve([row], [prior[row]]), k[: prior[row]], v[: prior[row]])
        history.append((row, k, v))
    history.sort()
    slots = cache.reserve(list(range(rows)), list(new))
    new_k = torch.cat([k[prior[r] :] for r, k, _ in history])
    new_v = torch.cat([v[prior[r] :] for r, _, v in history])
    cache.write(0, slots, new_k, new_v)
    query = torch.randn(sum(new), heads, head_dim, generator=g).to(DEVICE, dtype)
    layout = QueryLayout.build(list(range(rows)), prior, cu_seqlens(new), DEVICE)
    return cache, layout, query, history


def reference_outputs(query, history, prior, new, scale, window=None):
    outs, first = [], 0
    for (_row, k, v), p, n in zip(history, prior, new):
        positions = torch.arange(p, p + n, device=query.device)
        outs.append(dense_attention(query[first : first + n], k, v, positions, scale, window))
        first += n
    return torch.cat(outs)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim",
    [(4, 4, 64), (8, 2, 128), (6, 2, 80), (7, 1, 96)],  # MHA, GQA, odd head dim, MQA with 7 heads
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ragged_batch_matches_dense(impl, heads, kv_heads, head_dim, dtype):
    # decode (1), verification (3, 5) and prefill-like (13, 0 prior) rows; lengths cross blocks
    prior, new = [7, 0, 4, 16, 1], [1, 13, 3, 5, 1]
    cache, layout, query, history = build_case(prior, new, heads, kv_heads, head_dim, dtype)
    scale = 1 / math.sqrt(head_dim)
    out = paged_attention(
        query, cache.key_cache[0], cache.value_cache[0], cache.block_table, layout, scale=scale, impl=impl
    )
    expected = reference_outputs(query, history, prior, new, scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = ((out.double() - expected).norm() / expected.norm()).item()
    assert err < tol, err


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_sliding_window(impl):
    prior, new = [9, 2, 20], [4, 1, 6]
    cache, layout, query, history = build_case(prior, new, 4, 2, 64, torch.float32, seed=3)
    out = paged_attention(
        query,
        cache.key_cache[0],
        cache.value_cache[0],
        cache.block_table,
        layout,
        scale=0.125,
        sliding_window=5,
        impl=impl,
    )
    expected = reference_outputs(query, history, prior, new, 0.125, window=5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_after_truncation_the_dropped_tokens_are_never_read():
    """Truncate a row, overwrite the freed slots with NaN, attend again: same as a fresh cache."""
    prior, new = [10, 6], [2, 2]
    cache, layout, query, history = build_case(prior, new, 4, 2, 64, torch.float32, seed=5)
    cache.truncate([0], [7])  # drops 5 tokens of row 0, one whole block among them
    for layer_pool in (cache.key_cache[0], cache.value_cache[0]):
        for block in cache.free_stack[: cache.num_free_blocks].tolist():
            layer_pool[block] = float("nan")
        layer_pool.view(-1, *layer_pool.shape[2:])[cache.block_table[0, 1] * 4 + 3] = float("nan")  # slot 7
    layout = QueryLayout.build([0, 1], [6, 6], [0, 1, 3], DEVICE)  # row 0's last kept token, row 1's new ones
    q = query[:3]
    for impl in ("triton", "torch"):
        out = paged_attention(
            q, cache.key_cache[0], cache.value_cache[0], cache.block_table, layout, scale=0.125, impl=impl
        )
        assert torch.isfinite(out).all()
        expected = torch.cat(
            [
                dense_attention(q[:1], history[0][1][:7], history[0][2][:7], torch.tensor([6], device=DEVICE), 0.125),
                dense_attention(q[1:], history[1][1], history[1][2], torch.tensor([6, 7], device=DEVICE), 0.125),
            ]
        )
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_shapes():
    cache, layout, query, _ = build_case([2], [1], 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="cannot share"):
        paged_attention(query[:, :3], cache.key_cache[0], cache.value_cache[0], cache.block_table, layout, scale=1.0)
    with pytest.raises(ValueError, match="describes"):
        paged_attention(
            torch.cat([query, query]), cache.key_cache[0], cache.value_cache[0], cache.block_table, layout, scale=1.0
        )


# --- the split-context route (flash-decoding): chunks of each row's keys over several programs ---


def relative_error(out, expected):
    return ((out.double() - expected).norm() / expected.norm()).item()


def assert_as_accurate_as_torch(out, query, cache, layout, expected, scale, window=None):
    """The kernel's error against the float64 reference is at most plain PyTorch's (SDPA at the
    same precision) plus one unit of the dtype's precision (Cut Cross-Entropy's criterion)."""
    assert torch.isfinite(out).all()
    baseline = paged_attention(
        query,
        cache.key_cache[0],
        cache.value_cache[0],
        cache.block_table,
        layout,
        scale=scale,
        sliding_window=window,
        impl="torch",
    )
    slack = torch.finfo(query.dtype).eps
    assert relative_error(out, expected) <= relative_error(baseline, expected) + slack


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (12, 2)])  # GQA ratios 1 and 6
# bf16 on CUDA only: the interpreter's bf16 dot is wrong (triton issue 11584)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + [torch.bfloat16] * torch.cuda.is_available())
@pytest.mark.parametrize("new", [[1, 1, 1, 1, 1], [3, 1, 6, 2, 1]], ids=["decode", "verify"])
def test_split_route_matches_dense(heads, kv_heads, dtype, new):
    # chunks of 4 keys over 4-token blocks: row 0 (76 keys) takes 19 chunks, more than the merge
    # kernel takes per step; row 1 (4 keys: no longer than a chunk) and row 4 (no prior token) one;
    # lengths end mid-block
    prior = [75, 3, 21, 8, 0]
    cache, layout, query, history = build_case(prior, new, heads, kv_heads, 32, dtype, seed=1)
    plan = plan_splits(layout, kv_heads, block_size=4, split=4)
    per_tile = np.bincount(plan.work[:, 0], minlength=len(prior))
    assert per_tile.max() > paged_attention_module._MERGE_BLOCK_S and per_tile.min() == 1
    scale = 32**-0.5
    out = paged_attention(
        query, cache.key_cache[0], cache.value_cache[0], cache.block_table, layout, scale=scale, impl="triton", split=4
    )
    assert out.dtype == dtype
    assert_as_accurate_as_torch(out, query, cache, layout, reference_outputs(query, history, prior, new, scale), scale)


def test_split_route_sliding_window_and_fully_masked_chunks():
    """Window 5, chunks of 8: row 2's tokens at 20..29 see keys 16..29 in chunks [16, 24) and
    [24, 30); tokens 20..23 see nothing in the second (causal) and token 29 nothing in the first
    (window), so those partials carry lse −inf and must weigh nothing."""
    prior, new = [9, 2, 20], [4, 1, 10]
    cache, layout, query, history = build_case(prior, new, 12, 2, 32, torch.float32, seed=3)
    plan = plan_splits(layout, 2, block_size=4, sliding_window=5, split=8)
    assert plan.work[plan.work[:, 0] == 2, 1:].tolist() == [[16, 24], [24, 30]]
    out = paged_attention(
        query,
        cache.key_cache[0],
        cache.value_cache[0],
        cache.block_table,
        layout,
        scale=0.125,
        sliding_window=5,
        impl="triton",
        split=8,
    )
    expected = reference_outputs(query, history, prior, new, 0.125, window=5)
    assert_as_accurate_as_torch(out, query, cache, layout, expected, 0.125, window=5)


def test_auto_route_splits_long_decode_rows_and_equals_the_whole_context_route(monkeypatch):
    """Two decode rows of 600 and 300 keys, 2 K/V heads: 4 programs unsplit, so the chooser splits
    (chunks of 256 keys at the default SM count); the result equals the unsplit kernel's."""
    chunked = []
    monkeypatch.setattr(
        paged_attention_module,
        "_attend_in_chunks",
        lambda launch, plan, out: chunked.append(plan.chunk) or attend_in_chunks(launch, plan, out),
    )
    prior, new = [599, 299], [1, 1]
    cache, layout, query, history = build_case(prior, new, 12, 2, 32, torch.float32, block_size=16, num_blocks=64)
    pools = (cache.key_cache[0], cache.value_cache[0], cache.block_table, layout)
    out = paged_attention(query, *pools, scale=0.2, impl="triton")
    assert chunked == [256]
    whole = paged_attention(query, *pools, scale=0.2, impl="triton", split="off")
    assert chunked == [256]
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
    assert_as_accurate_as_torch(out, query, cache, layout, reference_outputs(query, history, prior, new, 0.2), 0.2)


attend_in_chunks = paged_attention_module._attend_in_chunks


def decode_layout(contexts, new=None):
    """A CPU layout of rows whose last new token sits at position ``contexts[i] − 1``."""
    new = [1] * len(contexts) if new is None else new
    starts = [c - n for c, n in zip(contexts, new)]
    return QueryLayout.build(list(range(len(contexts))), starts, cu_seqlens(new), torch.device("cpu"))


def assert_chunks_cover_each_tile(plan, layout, block_size, window=None):
    """Every tile has ≥ 1 chunk; its chunks run back to back from its lo to its hi, none longer
    than the chunk, boundaries on cache blocks; every token points at its own tile's chunks."""
    lo, hi = tile_key_ranges(layout, block_size, window)
    tile, first, end = plan.work.T
    assert (np.diff(tile) >= 0).all() and np.array_equal(np.unique(tile), np.arange(len(lo)))
    assert (end > first).all() and (end - first <= plan.chunk).all() and (first % block_size == 0).all()
    for t in range(len(lo)):
        mine = plan.work[tile == t]
        assert mine[0, 1] == lo[t] and mine[-1, 2] == hi[t] and (mine[1:, 1] == mine[:-1, 2]).all()
    starts, counts, index = plan.token_splits.T
    tiles_of_tokens = np.repeat(np.arange(len(lo)), layout.tiles[:, 2].numpy())
    assert np.array_equal(tile[starts], tiles_of_tokens) and np.array_equal(counts, np.bincount(tile)[tiles_of_tokens])
    assert (index < layout.block_q).all()


@pytest.mark.parametrize("rows,context", [(64, 8192), (8, 32768), (1, 32768), (16, 4096)])
@pytest.mark.parametrize("num_sms", [132, 108])  # H100/H200, A100
def test_chooser_fills_the_gpu(rows, context, num_sms):
    layout = decode_layout([context] * rows)
    plan = plan_splits(layout, n_kv_heads=2, block_size=16, num_sms=num_sms)
    assert plan.chunk % 16 == 0 and plan.chunk >= paged_attention_module._MIN_CHUNK
    target = paged_attention_module._PROGRAMS_PER_SM * num_sms
    assert paged_attention_module._PROGRAMS_PER_SM >= 2
    assert plan.num_chunks * 2 >= target or plan.chunk == paged_attention_module._MIN_CHUNK
    assert_chunks_cover_each_tile(plan, layout, 16)


def test_chooser_on_ragged_rows_and_verification_tiles():
    rng = np.random.default_rng(0)
    contexts = rng.integers(1, 32768, size=12)
    new = rng.integers(1, 6, size=12)
    contexts = np.maximum(contexts, new)
    layout = decode_layout(contexts.tolist(), new.tolist())
    plan = plan_splits(layout, n_kv_heads=4, block_size=16, num_sms=132)
    assert plan.num_chunks * 4 >= paged_attention_module._PROGRAMS_PER_SM * 132
    assert_chunks_cover_each_tile(plan, layout, 16)
    windowed = plan_splits(layout, n_kv_heads=4, block_size=16, sliding_window=4096, num_sms=132)
    assert_chunks_cover_each_tile(windowed, layout, 16, window=4096)
    keys_read = np.bincount(windowed.work[:, 0], weights=windowed.work[:, 2] - windowed.work[:, 1])
    assert (keys_read <= np.minimum(contexts, 4096 + new - 1 + 15)).all()  # nothing below the window's block


@pytest.mark.parametrize(
    "contexts,new,kv_heads",
    [
        ([200] * 8, None, 2),  # short: no row longer than the smallest chunk
        ([8192] * 600, None, 1),  # 600 programs already fill 132 SMs
        ([16384], [16384], 2),  # prefill: 1024 tiles of 16 tokens
    ],
    ids=["short", "wide", "prefill"],
)
def test_chooser_keeps_the_whole_context_route(contexts, new, kv_heads):
    assert plan_splits(decode_layout(contexts, new), kv_heads, block_size=16, num_sms=132) is None


def test_split_argument_checks():
    layout = decode_layout([100, 40])
    assert plan_splits(layout, 2, block_size=4, split="off") is None
    assert plan_splits(layout, 2, block_size=4, split=100) is None  # one chunk holds every row
    assert plan_splits(layout, 2, block_size=4, split=96).num_chunks == 3
    with pytest.raises(ValueError, match="multiple of the block size"):
        plan_splits(layout, 2, block_size=16, split=24)
    cache, layout, query, _ = build_case([2], [1], 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="split="):
        paged_attention(
            query, cache.key_cache[0], cache.value_cache[0], cache.block_table, layout, scale=1.0, split="always"
        )


def test_greedy_decode_on_the_split_route_matches_hf_generate(monkeypatch):
    """A tiny GQA model (6 query heads on 1 K/V head) decoding on the paged cache with every
    attention call split into chunks of 8 keys (the prefill's tiles too: causal masking inside a
    tile across chunks) greedily writes what ``generate`` writes. (The window's semantics through
    the split route: test_split_route_sliding_window_and_fully_masked_chunks.)"""
    import motab.models
    from motab.models import PagedModel, greedy_decode
    from motab.tiny import tiny_model

    shape = dict(vocab=101, hidden=48, intermediate=64, layers=2, heads=6, kv_heads=1, max_positions=64)
    model = tiny_model(1, **shape, initializer_range=0.4, attn_implementation="sdpa").to(DEVICE).eval()
    model.generation_config.eos_token_id = None  # eight tokens from every row
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62]]
    expected = [
        model.generate(torch.tensor([p], device=DEVICE), max_new_tokens=8, do_sample=False, pad_token_id=0)[
            0, len(p) :
        ].tolist()
        for p in prompts
    ]
    chunked = []
    monkeypatch.setattr(
        paged_attention_module,
        "_attend_in_chunks",
        lambda launch, plan, out: chunked.append(plan.num_chunks) or attend_in_chunks(launch, plan, out),
    )
    # every call split into chunks of 8 keys, whatever split the caller asks for
    monkeypatch.setattr(motab.models, "paged_attention", lambda *a, **k: paged_attention(*a, **{**k, "split": 8}))
    pm = PagedModel(model, max_rows=4, max_tokens=128, block_size=4, attention_impl="triton")
    got = greedy_decode(pm, prompts, 8)
    assert len(chunked) == pm.paged_attention_calls and max(chunked) > len(prompts)
    assert all(len(set(tokens)) >= 4 for tokens in expected), "degenerate outputs hide cache bugs"
    assert got == expected
