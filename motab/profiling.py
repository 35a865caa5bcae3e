"""Counters of the device work a piece of code asks for: the tensor operations that launch
kernels, the points where the host waits for the device, and the Triton launches and the
specialisations they compile. They run the same on a CPU (tests) and on a GPU (benchmarks).

On a GPU, every host read of device data (``.tolist()``, ``.item()``, ``int(t)``, a copy to the
CPU) and every operation whose output size depends on device data (``nonzero``, boolean-mask
indexing) waits for the device to finish all queued work: a decode loop that does so per row or
per layer cannot keep the GPU busy. On a CPU every tensor is on the host, so the counter is told
what would live on the device (``count_device_work(*device_state)``: models, caches, tensors):
every tensor computed from those is device data, and only reads of device data count, as they
would on a GPU. Tensors on a non-CPU device are device data wherever they come from.

A Triton kernel compiles once per *specialisation*: its constexpr values, its arguments' dtypes,
and for integer and pointer arguments whether they equal 1 / are divisible by 16 (Triton's
default specialisation rule). A rollout whose batch composition and draft lengths vary must not ask
for a new one each round: ``WorkCount.specialisations`` holds the distinct keys launched.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

# Operations whose output size depends on the data: on a GPU they wait for the device.
_DATA_DEPENDENT_OPS = {
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
}
# Reads of a tensor's values by the host (at the Python level: tolist and numpy bypass dispatch).
_HOST_READ_METHODS = {"tolist", "numpy"}


@dataclass
class WorkCount:
    """What a block of code asked of the device (see the module's docstring)."""

    ops: int = 0  # tensor operations that launch work (views excluded: they only make metadata)
    views: int = 0
    syncs: int = 0  # host reads of tensor values and data-dependent output sizes
    triton_launches: int = 0
    specialisations: set = field(default_factory=set)  # (kernel, key) pairs launched
    by_op: Counter = field(default_factory=Counter)
    by_sync: Counter = field(default_factory=Counter)

    def __sub__(self, other: WorkCount) -> WorkCount:
        return WorkCount(
            ops=self.ops - other.ops,
            views=self.views - other.views,
            syncs=self.syncs - other.syncs,
            triton_launches=self.triton_launches - other.triton_launches,
            specialisations=self.specialisations - other.specialisations,
            by_op=self.by_op - other.by_op,
            by_sync=self.by_sync - other.by_sync,
        )

    def snapshot(self) -> WorkCount:
        return WorkCount(
            self.ops,
            self.views,
            self.syncs,
            self.triton_launches,
            set(self.specialisations),
            Counter(self.by_op),
            Counter(self.by_sync),
        )


class _DeviceData:
    """Which tensors hold device data: those on a non-CPU device, the given device state, and
    (on a CPU) every tensor an operation computed from device data."""

    def __init__(self, device_state) -> None:
        self._tensors = WeakTensorKeyDictionary()
        for tensor in _tensors_of(device_state, set()):
            self._tensors[tensor] = True

    def __contains__(self, x) -> bool:
        return isinstance(x, torch.Tensor) and (x.device.type != "cpu" or x in self._tensors)

    def any_of(self, tree) -> bool:
        return any(x in self for x in pytree.tree_leaves(tree))

    def add_all(self, tree) -> None:
        for x in pytree.tree_leaves(tree):
            while isinstance(x, torch.Tensor):  # a view written in place holds device data in its base too
                self._tensors[x] = True
                x = x._base


def _tensors_of(state, visited: set) -> Iterator[torch.Tensor]:
    """The tensors of models, caches (their tensor attributes) and tensors, nested in lists."""
    if id(state) in visited:
        return
    visited.add(id(state))
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, torch.nn.Module):
        yield from state.parameters()
        yield from state.buffers()
    elif isinstance(state, (list, tuple)):
        for item in state:
            yield from _tensors_of(item, visited)
    elif hasattr(state, "__dict__"):
        for value in vars(state).values():
            if isinstance(value, (torch.Tensor, torch.nn.Module, list, tuple)) or hasattr(value, "__dict__"):
                yield from _tensors_of(value, visited)


class _OpCounter(TorchDispatchMode):
    def __init__(self, count: WorkCount, device_data: _DeviceData) -> None:
        super().__init__()
        self.count, self.device_data = count, device_data

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if func.is_view:
            self.count.views += 1
        else:
            self.count.ops += 1
            self.count.by_op[name] += 1
        reads_device = self.device_data.any_of((args, kwargs))
        if reads_device and _waits_for_device(func, args, kwargs):
            self.count.syncs += 1
            self.count.by_sync[name] += 1
        out = func(*args, **kwargs)
        if reads_device:
            self.device_data.add_all(out)
        return out


def _waits_for_device(func, args, kwargs: dict) -> bool:
    """Whether ``func`` makes the host wait for the device on a GPU."""
    name = func._schema.name
    if name == "aten::repeat_interleave":  # its output size is the repeats' sum unless given
        return kwargs.get("output_size") is None
    return name == "aten::_local_scalar_dense" or name in _DATA_DEPENDENT_OPS or _copies_to_host(func, args, kwargs)


def _copies_to_host(func, args, kwargs: dict) -> bool:
    """A copy of a non-CPU tensor to the CPU (``.cpu()``, ``.to("cpu")``)."""
    if func._schema.name not in ("aten::_to_copy", "aten::copy_"):
        return False
    source = args[1] if func._schema.name == "aten::copy_" else args[0]
    target = args[0].device if func._schema.name == "aten::copy_" else kwargs.get("device")
    return source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


class _HostReadCounter(TorchFunctionMode):
    def __init__(self, count: WorkCount, device_data: _DeviceData) -> None:
        super().__init__()
        self.count, self.device_data = count, device_data

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READ_METHODS and args and args[0] in self.device_data:
            self.count.syncs += 1
            self.count.by_sync[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


def _specialisation_key(kernel, args, kwargs) -> tuple:
    """What Triton compiles ``kernel`` for, for these launch arguments."""
    names = kernel.arg_names
    bound = dict(zip(names, args))
    bound.update(kwargs)
    constexprs, unspecialised = _parameter_kinds(kernel)
    key = []
    for name in names:
        value = bound.get(name)
        if name in constexprs:
            key.append((name, value))
        elif isinstance(value, torch.Tensor):
            key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or not isinstance(value, int) or name in unspecialised:
            key.append((name, type(value).__name__))
        else:
            key.append((name, "1" if value == 1 else "16" if value % 16 == 0 else "int"))
    return kernel.__name__, tuple(key)


def _parameter_kinds(kernel) -> tuple[set[str], set[str]]:
    """The kernel's constexpr parameters and those it does not specialise on (a compiled kernel
    knows them; under the interpreter they are read from the function's annotations)."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params if p.is_constexpr}, {p.name for p in kernel.params if p.do_not_specialize}
    signature = inspect.signature(kernel.fn)
    return {n for n, p in signature.parameters.items() if "constexpr" in str(p.annotation)}, set()


@contextlib.contextmanager
def _counting_triton_launches(count: WorkCount) -> Iterator[None]:
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    originals = {cls: cls.run for cls in (jit.JITFunction, interpreter.InterpretedFunction)}

    def counted(original):
        def run(self, *args, grid, warmup, **kwargs):
            if not warmup:
                count.triton_launches += 1
                launch = {k: v for k, v in kwargs.items() if k in self.arg_names}
                count.specialisations.add(_specialisation_key(self, args, launch))
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

        return run

    try:
        for cls, original in originals.items():
            cls.run = counted(original)
        yield
    finally:
        for cls, original in originals.items():
            cls.run = original


class RoundWork:
    """A rollout's ``round_hook`` (``motab.engine.rollout``): the device work of every round,
    by kind ("draft", "teacher"), read from ``count`` as the rounds run."""

    def __init__(self, count: WorkCount) -> None:
        self.count = count
        self.rounds: dict[str, list[WorkCount]] = {"draft": [], "teacher": []}

    @contextlib.contextmanager
    def __call__(self, kind: str) -> Iterator[None]:
        before = self.count.snapshot()
        yield
        self.rounds[kind].append(self.count.snapshot() - before)


@contextlib.contextmanager
def count_device_work(*device_state) -> Iterator[WorkCount]:
    """Counts the device work of the block; read the yielded ``WorkCount`` (live, or after).
    ``snapshot()`` and subtraction give the work between two points. ``device_state``: what would
    live on the device when the block runs on a CPU (models, caches, ``PagedModel``s, tensors)."""
    count, device_data = WorkCount(), _DeviceData(device_state)
    with _counting_triton_launches(count), _HostReadCounter(count, device_data), _OpCounter(count, device_data):
        yield count
