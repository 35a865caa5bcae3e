"""PagedKVCache bookkeeping: reserve, truncate, reset, errors, the two implementations agree, and
what one call costs (no read-back from the device, a fixed number of ops and launches, no per-row
Python, no plan buffer overwritten while in flight)."""

from __future__ import annotations

import collections
import random
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("call", ["truncate", "reserve"])
@pytest.mark.parametrize("rows", [1, 6])
def test_bookkeeping_is_one_launch_for_any_number_of_rows(call, rows, monkeypatch):
    launches = []
    kernel = paged_kv._move_blocks_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(paged_kv, "_move_blocks_kernel", Counting())
    cache = make_cache("triton", num_blocks=64, max_rows=6)
    cache.reserve(list(range(6)), [9, 1, 17, 4, 12, 30])
    launches.clear()
    if call == "truncate":
        cache.truncate(list(range(rows)), [3, 0, 17, 2, 5, 1][:rows])
    else:
        cache.reserve(list(range(rows)), [5, 0, 3, 9, 1, 2][:rows])
    assert launches == [(rows,)]
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


def test_rows_and_lengths_as_tensors_act_like_lists():
    caches = [make_cache("torch") for _ in range(2)]
    slots = [
        caches[0].reserve([3, 1], [6, 2]),
        caches[1].reserve(torch.tensor([3, 1], device=DEVICE), torch.tensor([6, 2], device=DEVICE)),
    ]
    assert torch.equal(*slots)
    caches[0].truncate([3, 1], [1, 2])
    caches[1].truncate(torch.tensor([3, 1], device=DEVICE), torch.tensor([1, 2]))
    assert_same(snapshot(caches[0]), snapshot(caches[1]))


# --- What one call costs, checked without a GPU ----------------------------------------------
#
# A cache on the "meta" device stands in for a GPU whose memory the host cannot read: any
# read-back (.item(), int(), .tolist(), .cpu(), a size taken from device data) raises there. The
# torch implementation runs the same host path as the Triton one up to the launch, so counting
# its ops shows whether a call's work grows with its rows.


class OpLog(TorchDispatchMode):
    """Every ATen op dispatched inside the context, and how many copied host memory to a device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.uploads = 0  # copies from host memory into a device tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        if func is torch.ops.aten.copy_.default and args[0].device.type != "cpu" and args[1].device.type == "cpu":
            self.uploads += 1
        return func(*args, **(kwargs or {}))


def meta_cache(max_rows=256):
    return PagedKVCache(2, 2, 8, num_blocks=8 * max_rows, block_size=4, max_rows=max_rows, device="meta", impl="torch")


def logged_call(call, rows):
    """The ops of one ``call`` on ``rows`` rows (scattered over the table), each row 9 tokens long
    before it: truncation frees two blocks per row, reserve adds one and fills another."""
    cache = meta_cache()
    ids = list(range(255, 255 - 2 * rows, -2))
    cache.reserve(ids, [9] * rows)
    with OpLog() as log:
        if call == "truncate":
            cache.truncate(ids, [1] * rows)
        else:
            cache.reserve(ids, [6] * rows)
    assert cache.lengths(ids) == [1 if call == "truncate" else 15] * rows
    return log


@pytest.mark.parametrize("call", ["truncate", "reserve"])
def test_bookkeeping_reads_nothing_back_and_runs_the_same_ops_for_any_number_of_rows(call):
    # From 2 rows on: with a single row torch's repeat_interleave broadcasts its one count (a view
    # and an expand more), which is not work per row.
    logs = {rows: logged_call(call, rows) for rows in (1, 2, 16, 128)}
    for rows, log in logs.items():
        assert "aten._local_scalar_dense.default" not in log.ops, f"{rows} rows: a value was read from the device"
        assert log.uploads == 1, f"{rows} rows: the plan must travel in one copy, got {log.uploads}"
        if rows > 2:
            assert log.ops == logs[2].ops, f"{rows} rows ran other ops than 2 rows: {collections.Counter(log.ops)}"


def python_lines_run(cache, call, ids, lengths):
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return tracer

    previous = sys.gettrace()  # a coverage tool's, say
    sys.settrace(tracer)
    try:
        getattr(cache, call)(ids, lengths)
    finally:
        sys.settrace(previous)
    return lines


@pytest.mark.parametrize("call", ["truncate", "reserve"])
def test_bookkeeping_runs_no_python_per_row(call):
    """Checks, plan and launch are vectorised: the Python lines a call runs do not grow with rows.
    On the CPU, where every torch op is compiled code (on "meta" many run as Python)."""
    lines = {}
    for rows in (2, 200):
        cache = PagedKVCache(1, 1, 4, num_blocks=2048, block_size=4, max_rows=256, impl="torch")
        ids = list(range(rows))
        cache.reserve(ids, [9] * rows)
        lines[rows] = python_lines_run(cache, call, ids, [1 if call == "truncate" else 6] * rows)
    assert lines[200] == lines[2], lines


class FakeFence:
    """Stands in for a CUDA event: "passed" only when the test says the GPU got there."""

    def __init__(self) -> None:
        self.passed = False

    def record(self) -> None:
        self.passed = False

    def query(self) -> bool:
        return self.passed

    def synchronize(self) -> None:
        self.passed = True


def fenced_ring(rows=4, device="cpu", max_slots=64, capturing=False):
    return paged_kv.PlanRing(rows, torch.device(device), FakeFence, max_slots=max_slots, capturing=lambda: capturing)


def test_plan_ring_never_hands_out_a_slot_still_in_flight():
    ring = fenced_ring()
    first = ring.take()
    ring.give_back(first)  # its copy and kernel are queued, not yet run
    second = ring.take()
    assert second is not first and second.host is not first.host
    ring.give_back(second)
    first.fence.passed = True
    assert ring.take() is first  # reused once the GPU is past it
    ring.give_back(first)
    for _ in range(5):  # a caller the GPU keeps up with: the ring stops growing
        second.fence.passed = first.fence.passed = True
        ring.give_back(ring.take())
    assert ring.size == 2


def test_plan_ring_waits_only_when_max_slots_calls_are_in_flight():
    ring = fenced_ring(max_slots=3)
    in_flight = []
    for _ in range(3):
        in_flight.append(ring.take())
        ring.give_back(in_flight[-1])
    assert len({id(s) for s in in_flight}) == 3 and not any(s.fence.passed for s in in_flight)
    assert ring.take() is in_flight[0] and in_flight[0].fence.passed  # waited for the oldest
    assert ring.size == 2  # the other two, still in flight


def test_plan_ring_gives_a_captured_graph_its_own_slot():
    ring = fenced_ring(capturing=True)
    captured = ring.take()
    ring.give_back(captured)  # replays read it: it never returns to the ring, no event recorded
    assert captured.fence is None and ring.size == 1 and ring.take() is not captured


def test_a_call_leaves_the_plan_of_a_call_in_flight_alone():
    cache = make_cache("torch", num_blocks=64)
    cache._plans = fenced_ring(cache.max_rows, DEVICE)  # every call's copy stays queued
    cache.reserve([0, 1, 2], [9, 4, 7])
    in_flight = cache._plans._slots[-1]
    plan = in_flight.host[:3].copy()
    cache.truncate([2, 0], [1, 5])
    cache.reserve([1], [30])
    assert np.array_equal(in_flight.host[:3], plan)
    check_invariants(cache)


def test_calls_on_no_rows_give_their_plan_slot_back():
    cache = paged_kv.PagedKVCache(1, 1, 4, num_blocks=8, block_size=4, max_rows=2)
    cache._plans = fenced_ring(rows=2)
    for call in [cache.truncate, cache.reserve] * 3:
        for slot in cache._plans._slots:  # the GPU is past every earlier call
            slot.fence = slot.fence or FakeFence()
            slot.fence.passed = True
        call([], [])
        assert cache._plans.size == 1  # the one slot went out and came back
