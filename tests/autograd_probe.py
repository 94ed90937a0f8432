"""What autograd keeps from a forward for its backward, for the memory tests of the qdq nodes."""

from __future__ import annotations

from typing import Callable

import torch


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward while fn() runs (a tensor saved twice, or a
    view of the same storage with the same shape and dtype, counts once)."""
    seen = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
