"""Activation memory of a forward pass on CPU: the bytes autograd keeps for backward.

Every tensor saved through ``torch.autograd.graph.saved_tensors_hooks`` plus tensors that custom autograd Functions
stash on their ``ctx`` (MinkowskiEngine does, bypassing the hooks), each storage counted once (by ``data_ptr``);
parameters, buffers and the inputs excluded. Copies made in the forward and kept for backward count (im2col columns,
re-laid-out kernels): on a GPU they would count as well. Memory the graph does not hold (MinkowskiEngine's C++
coordinate maps) is not seen. The peak of a training step is at the end of its forward pass, so this is the step's
activation peak; on CUDA the benchmark reads ``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """``(data_ptr, nbytes)`` of the storage behind ``tensor`` (views share it), None when it has none."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / wrapper tensors without one plain storage
        return None
    return storage.data_ptr(), storage.nbytes()


def _graph_nodes(outputs: Iterable[torch.Tensor]) -> Iterable[Any]:
    seen: set[int] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(parent for parent, _ in node.next_functions)


def saved_activation_bytes(forward: Callable[[], Sequence[torch.Tensor]], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages that ``forward()`` keeps alive for backward.

    Args:
        forward: runs the forward pass and returns its output tensors (their graph is walked, then dropped).
        exclude: tensors not to count (parameters, buffers, inputs: they exist with or without the pass).
    """
    excluded = {key[0] for key in map(_storage_key, exclude) if key is not None}
    counted: dict[int, int] = {}

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            key = _storage_key(value)
            if key is not None and key[0] != 0 and key[0] not in excluded:
                counted[key[0]] = key[1]
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        add(tensor)
        # Detached: a saved *output* packed as itself holds its own grad_fn, a cycle through C++ that Python's gc
        # cannot see, so the whole graph (activations, and the model through AccumulateGrad) would never be freed.
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = forward()
    # Custom autograd Functions may keep tensors as ctx attributes instead of save_for_backward; the hooks never
    # see those, but the ctx *is* the graph node, so its attributes can be read there.
    for node in _graph_nodes(outputs):
        for value in getattr(node, "__dict__", {}).values():
            add(value)
    return sum(counted.values())


def release_memory(device: torch.device) -> None:
    """Give the memory of finished configurations back: collect Python's cycles, empty CUDA's caching allocator and
    trim glibc's heap (freed blocks of a big model otherwise stay in the process, fragmented, as resident memory)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    libc = ctypes.util.find_library("c")
    if libc is not None and hasattr(ctypes.CDLL(libc), "malloc_trim"):  # glibc only (not musl, macOS)
        ctypes.CDLL(libc).malloc_trim(0)
