"""CUDA graphs of a ``PagedModel``'s one-token decode steps.

A decode step of a 1.5B model launches several hundred small kernels (per layer: norms, QKV, RoPE,
the cache write, attention, MLP); at batch 1–64 the GPU finishes each faster than Python issues
the next, so the step costs the host's launch time, not the GPU's. A captured graph replays all
of them with one launch.

A graph replays fixed kernels on fixed addresses, so each bucket of row counts (1, 2, 4, …, the
cache's rows) gets its own, captured the first time a step of that many rows comes, and fed
through static buffers:

- the new token ids, ``[b]``;
- one int32 buffer with every token's position and its attention tile (row, token, count), filled
  by one host→device copy;
- the cache slots the step's K/V go to (``PagedKVCache.reserve`` runs before, outside the graph).

A step of R < b rows pads the rest: padding tokens write their K/V to the cache's scratch slot
(a block no row owns) and attend to the first real row's first key, so everything they compute is
finite and none of it reaches a real row (every operation of a decoder layer but attention is per
token, and attention reads the cache by the tile's row). Attention runs the one-program-per-tile
route, whose grid is the bucket: the split route's chunks are planned on the host from the rows'
lengths, which a replay would not see. What the graph reads from the host is only what it was
captured with, so the static layout's host arrays are filled with -1 (a path that read them would
give wrong results, which the tests would see).

``backend="eager"`` runs the same padded step without capturing it (CPU tests, and the reference
a graph must equal bit for bit). The weights' addresses are part of a graph: when they change
(``model.to``, a new set of gathered FSDP weights) the graphs are captured anew.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from motab_kernels.paged_attention import QueryLayout
from motab_kernels.paged_kv import PagedKVCache, PlanRing

Backend = Literal["cuda", "eager"]


class PagedDecoder(Protocol):
    """What the graphs need of a ``motab.models.PagedModel``."""

    model: torch.nn.Module
    decoder: torch.nn.Module
    cache: PagedKVCache
    attention_impl: str

    @property
    def device(self) -> torch.device: ...

    @property
    def max_rows(self) -> int: ...

    def forward_packed(
        self, ids: torch.Tensor, layout: QueryLayout, slots: torch.Tensor, split: str = "auto"
    ) -> torch.Tensor: ...


def default_buckets(max_rows: int) -> list[int]:
    """Powers of two up to ``max_rows``, and ``max_rows`` itself: a step pads at most to twice its rows."""
    buckets, size = [], 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    return buckets + [max_rows]


@dataclass
class _Bucket:
    """The static buffers of one bucket of ``size`` rows and what replays its step. Replays and
    refills are ordered by the stream they are issued on: decode on one stream."""

    size: int
    ids: torch.Tensor  # [size] int64
    plan: torch.Tensor  # [size * 4] int32: positions, then (row, token, count) per tile
    slots: torch.Tensor  # [size] int64
    layout: QueryLayout
    replay: Callable[[], torch.Tensor] | None = None  # the step's final hidden states [size, hidden]


class DecodeGraphs:
    """One captured decode step per bucket of row counts for ``paged`` (see the module docstring).

    Args:
        paged: the model and cache the steps run on; its attention must be the Triton kernel.
        backend: ``"cuda"`` (capture ``torch.cuda.CUDAGraph``s) or ``"eager"`` (run the padded
            step as it would be captured, without capturing: CPU tests and reference).
        buckets: row counts a graph is captured for (default ``default_buckets``); a step of more
            rows than the largest runs eagerly.
    """

    def __init__(self, paged: PagedDecoder, backend: Backend = "cuda", buckets: Sequence[int] | None = None) -> None:
        if backend not in ("cuda", "eager"):
            raise ValueError(f"unknown decode graph backend {backend!r}; expected 'cuda' or 'eager'")
        if backend == "cuda" and paged.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {paged.device}")
        impl = paged.attention_impl
        if impl == "torch" or (impl == "auto" and paged.device.type != "cuda"):
            raise ValueError("decode graphs need the Triton attention (attention_impl 'triton', or 'auto' on CUDA)")
        rope = getattr(getattr(paged.decoder, "rotary_emb", None), "rope_type", "default")
        if "dynamic" in rope:
            raise ValueError(
                f"decode graphs cannot capture {rope!r} RoPE: it compares the positions with its cache on the host"
            )
        self.paged, self.backend = paged, backend
        self.buckets = sorted(set(buckets or default_buckets(paged.max_rows)))
        self._buckets: dict[int, _Bucket] = {}
        # pinned, fenced host buffers for the positions and tiles (see PlanRing): a copy from pageable
        # memory could make the host wait for the device, which is what the graphs are to avoid
        self._staging = PlanRing.on(paged.device, 1, width=4 * self.buckets[-1])
        self._addresses = self._weight_addresses()
        self.captures = 0  # graphs captured so far (a test and the benchmark read it)

    def covers(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows runs through a bucket."""
        return 0 < rows <= self.buckets[-1]

    def step(self, rows: Sequence[int], ids: torch.Tensor, starts: Sequence[int], slots: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[len(rows), hidden]`` of one new token per row: ``ids[i]`` (on the
        device) at position ``starts[i]`` of row ``rows[i]``, its K/V going to ``slots[i]``."""
        addresses = self._weight_addresses()
        if addresses != self._addresses:
            self._buckets.clear()  # the graphs read the old weights' memory
            self._addresses = addresses
        count = len(rows)
        bucket = self._bucket(next(b for b in self.buckets if b >= count))
        self._fill(bucket, rows, ids, starts, slots)
        if bucket.replay is None:
            bucket.replay = self._capture(bucket)
        # the next replay overwrites the graph's output; the caller may keep this step's
        return bucket.replay()[:count].clone()

    # ---------------------------------------------------------------------------------------
    def _weight_addresses(self) -> list[int]:
        """Where the model's weights and buffers are now. Read from the model at every step, never
        kept: FSDP puts new parameter objects in the modules when it gathers them, and holding the
        old ones would keep a whole copy of the weights alive."""
        model = self.paged.model
        return [t.data_ptr() for t in model.parameters()] + [t.data_ptr() for t in model.buffers()]

    def _bucket(self, size: int) -> _Bucket:
        if size not in self._buckets:
            device = self.paged.device
            plan = torch.zeros(size * 4, dtype=torch.int32, device=device)
            unknown = np.full(size, -1, dtype=np.int64)  # what a replay cannot read from the host
            layout = QueryLayout(unknown, unknown, np.arange(size + 1), plan[:size], plan[size:].view(size, 3), 1)
            self._buckets[size] = _Bucket(
                size,
                ids=torch.zeros(size, dtype=torch.long, device=device),
                plan=plan,
                slots=torch.full((size,), self.paged.cache.scratch_slot, dtype=torch.long, device=device),
                layout=layout,
            )
        return self._buckets[size]

    def _fill(self, bucket: _Bucket, rows, ids: torch.Tensor, starts, slots: torch.Tensor) -> None:
        """The step's inputs into the bucket's buffers, padding after the real rows."""
        count, size = len(rows), bucket.size
        staging = self._staging.take()
        plan = staging.host[0, : 4 * size]  # as bucket.plan: positions, then (row, token, count) per tile
        positions, tiles = plan[:size], plan[size:].reshape(size, 3)
        positions[:count], positions[count:] = starts, 0
        tiles[:count, 0], tiles[count:, 0] = rows, rows[0]
        tiles[:, 1], tiles[:, 2] = np.arange(size), 1
        self._staging.copy_into(staging, bucket.plan)
        self._staging.give_back(staging)
        bucket.ids[:count].copy_(ids)
        bucket.slots[:count].copy_(slots)
        if count < size:  # a larger step before may have left real slots there
            bucket.slots[count:].fill_(self.paged.cache.scratch_slot)

    def _capture(self, bucket: _Bucket) -> Callable[[], torch.Tensor]:
        """What replays the bucket's step: its graph, or (eager backend) the step itself."""

        def forward() -> torch.Tensor:
            return self.paged.forward_packed(bucket.ids, bucket.layout, bucket.slots, split="off")

        self.captures += 1
        if self.backend == "eager":
            return forward
        device = self.paged.device
        with torch.cuda.device(device):
            # kernels compile, cuBLAS makes its handles, allocations settle: all before capture, on
            # the stream that then captures
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                forward()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                # a memory pool of its own: no other graph's replay can overwrite this one's output
                with torch.cuda.graph(graph, stream=side):
                    output = forward()
            except RuntimeError as error:
                raise RuntimeError(
                    f"capturing the decode step of {bucket.size} rows in a CUDA graph failed ({error}); "
                    "decode without graphs (rollout.cuda_graphs: false)"
                ) from error

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay
