"""paged_attention (Triton and PyTorch) against dense attention over each row's own K/V history."""

from __future__ import annotations

import math

import pytest
import torch

from motab_kernels.paged_attention import QueryLayout, paged_attention
from motab_kernels.paged_kv import PagedKVCache
from motab_kernels.ragged import cu_seqlens

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def build_case(prior, new, heads, kv_heads, head_dim, dtype, block_size=4, seed=0):
    """A cache whose rows hold ``prior[i]`` old tokens plus ``new[i]`` new ones; every pool slot no
    row owns is NaN, so a read past a row's length would poison the output."""
    g = torch.Generator().manual_seed(seed)
    rows = len(prior)
    cache = PagedKVCache(
        1, kv_heads, head_dim, num_blocks=64, block_size=block_size, max_rows=rows + 1, dtype=dtype, device=DEVICE
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
