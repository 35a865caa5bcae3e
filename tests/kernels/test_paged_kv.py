"""PagedKVCache bookkeeping: reserve, truncate, reset, errors, and the two implementations agree."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from motab_kernels import paged_kv
from motab_kernels.paged_kv import EMPTY_BLOCK, OutOfBlocksError, PagedKVCache

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ["triton", "torch"]


def make_cache(impl, num_blocks=32, block_size=4, max_rows=6, layers=2, heads=2, head_dim=8, **kw):
    return PagedKVCache(
        layers,
        heads,
        head_dim,
        num_blocks=num_blocks,
        block_size=block_size,
        max_rows=max_rows,
        device=DEVICE,
        impl=impl,
        **kw,
    )


def snapshot(cache):
    return [x.clone() for x in (cache.block_table, cache.seq_lens, cache.free_stack, *cache.key_cache)] + [
        cache.num_free_blocks,
        cache.lengths(),
    ]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


def check_invariants(cache):
    """Every block is either free (below the stack top) or owned by exactly one row, in order."""
    lens = cache.lengths()
    assert cache.seq_lens.tolist() == lens
    table = cache.block_table.cpu().numpy()
    owned = []
    for row, length in enumerate(lens):
        need = -(-length // cache.block_size)
        assert (table[row, :need] >= 0).all(), f"row {row} misses blocks"
        assert (table[row, need:] == EMPTY_BLOCK).all(), f"row {row} keeps blocks past its end"
        owned += table[row, :need].tolist()
    free = cache.free_stack[: cache.num_free_blocks].tolist()
    assert sorted(owned + free) == list(range(cache.num_blocks))


@pytest.mark.parametrize("impl", IMPLS)
def test_reserve_gives_distinct_slots_in_position_order(impl):
    cache = make_cache(impl)
    slots = cache.reserve([1, 4, 0], [5, 0, 9])
    check_invariants(cache)
    assert cache.lengths() == [9, 5, 0, 0, 0, 0]
    assert slots.shape == (14,) and len(set(slots.tolist())) == 14
    # token p of a row lives at table[row, p // bs] * bs + p % bs
    table = cache.block_table.cpu()
    expected = [int(table[r, p // 4]) * 4 + p % 4 for r, n in ((1, 5), (0, 9)) for p in range(n)]
    assert slots.tolist() == expected
    more = cache.reserve([1], [3])
    assert more.tolist() == [int(table[1, 1]) * 4 + 1, int(table[1, 1]) * 4 + 2, int(table[1, 1]) * 4 + 3]


@pytest.mark.parametrize("impl", IMPLS)
def test_truncate_frees_whole_blocks_and_moves_no_kv(impl):
    cache = make_cache(impl)
    cache.reserve([0, 1, 2], [13, 8, 3])
    for layer in range(2):
        cache.key_cache[layer].normal_()
        cache.value_cache[layer].normal_()
    pools = [x.clone() for x in cache.key_cache + cache.value_cache]
    free_before = cache.num_free_blocks
    cache.truncate([0, 1, 2], [5, 8, 0])  # 4 → 2 blocks, unchanged, 1 → 0 blocks
    check_invariants(cache)
    assert cache.lengths()[:3] == [5, 8, 0]
    assert cache.num_free_blocks == free_before + 3
    for before, after in zip(pools, cache.key_cache + cache.value_cache):
        assert torch.equal(before, after)


@pytest.mark.parametrize("impl", IMPLS)
def test_truncate_is_one_launch_for_any_number_of_rows(impl, monkeypatch):
    if impl != "triton":
        pytest.skip("counts Triton launches")
    launches = []
    kernel = paged_kv._move_blocks_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(paged_kv, "_move_blocks_kernel", Counting())
    cache = make_cache(impl, num_blocks=64, max_rows=6)
    cache.reserve(list(range(6)), [9, 1, 17, 4, 12, 30])
    launches.clear()
    cache.truncate(list(range(6)), [3, 0, 17, 2, 5, 1])
    assert len(launches) == 1
    check_invariants(cache)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_to_zero_returns_the_whole_pool(impl):
    cache = make_cache(impl)
    cache.reserve([0, 2, 5], [7, 20, 1])
    cache.reset()
    check_invariants(cache)
    assert cache.num_free_blocks == cache.num_blocks and cache.lengths() == [0] * 6


@pytest.mark.parametrize("impl", IMPLS)
def test_exhausted_pool_raises_and_changes_nothing(impl):
    cache = make_cache(impl, num_blocks=8)
    cache.reserve([0, 1], [10, 9])  # 3 + 3 blocks
    before = snapshot(cache)
    with pytest.raises(OutOfBlocksError, match=r"3 blocks needed .* 2 of 8 free"):
        cache.reserve([2, 3], [4, 5])
    assert_same(before, snapshot(cache))


@pytest.mark.parametrize("impl", IMPLS)
def test_invalid_calls_raise_and_change_nothing(impl):
    cache = make_cache(impl, max_blocks_per_row=4)
    cache.reserve([0, 1], [6, 2])
    before = snapshot(cache)
    with pytest.raises(ValueError, match="cannot truncate row 1 of length 2 to 3"):
        cache.truncate([0, 1], [1, 3])
    with pytest.raises(ValueError, match="to -1"):
        cache.truncate([0], [-1])
    with pytest.raises(ValueError, match="distinct"):
        cache.truncate([0, 0], [1, 1])
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 6\)"):
        cache.reserve([6], [1])
    with pytest.raises(ValueError, match="max_blocks_per_row"):
        cache.reserve([0], [11])
    with pytest.raises(ValueError, match="non-negative"):
        cache.reserve([0], [-1])
    assert_same(before, snapshot(cache))


def test_both_implementations_agree_on_random_histories():
    """The Triton kernel and the PyTorch index ops leave identical tables and stacks."""
    rng = random.Random(0)
    caches = [make_cache(impl, num_blocks=48, block_size=3, max_rows=5) for impl in IMPLS]
    for _ in range(60):
        rows = rng.sample(range(5), rng.randint(1, 5))
        lens = caches[0].lengths(rows)
        if rng.random() < 0.6:
            counts = [rng.randint(0, 7) for _ in rows]
            if caches[0].blocks_needed(rows, counts) > caches[0].num_free_blocks:
                for cache in caches:
                    with pytest.raises(OutOfBlocksError):
                        cache.reserve(rows, counts)
                continue
            slots = [cache.reserve(rows, counts) for cache in caches]
            assert torch.equal(slots[0], slots[1])
        else:
            new = [rng.randint(0, n) for n in lens]
            for cache in caches:
                cache.truncate(rows, new)
        for cache in caches:
            check_invariants(cache)
        assert_same(snapshot(caches[0]), snapshot(caches[1]))


def test_write_places_kv_at_slots():
    cache = make_cache("torch", heads=3, head_dim=5)
    slots = cache.reserve([2], [6])
    k, v = torch.randn(6, 3, 5, device=DEVICE), torch.randn(6, 3, 5, device=DEVICE)
    cache.write(1, slots, k, v)
    flat_k = cache.key_cache[1].view(-1, 3, 5)
    assert torch.equal(flat_k[slots], k) and torch.equal(cache.value_cache[1].view(-1, 3, 5)[slots], v)
    assert torch.all(cache.key_cache[0] == 0)


def test_bad_construction():
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        make_cache("torch", num_blocks=0)
    with pytest.raises(ValueError, match="unknown impl"):
        make_cache("cuda")
    assert np.array_equal(make_cache("torch").free_stack[-3:].cpu().numpy(), [2, 1, 0])
