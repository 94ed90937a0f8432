"""Layers that inference runtimes fuse into one matmul, found by their names.

vLLM and TensorRT-LLM concatenate q/k/v (and gate/up) into one weight, so such siblings must share what
the fused kernel can only hold once: NVFP4's per-tensor global scale, and (AutoScheme) the bit width.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping

# sibling suffixes fused together; the rest of the name (the parent module) must match
FUSED_SUFFIXES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),  # Mixtral-style experts
    ("to_q", "to_k", "to_v"),  # diffusers attention
)


def fused_groups(names: Iterable[str]) -> list[list[str]]:
    """Groups (2 or more names each, in the given order) of layers that share a parent and a fused set."""
    by_key: dict[tuple[str, int], list[str]] = defaultdict(list)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for i, suffixes in enumerate(FUSED_SUFFIXES):
            if leaf in suffixes:
                by_key[(parent, i)].append(name)
    return [group for group in by_key.values() if len(group) > 1]


def mixed_groups(schemes: Mapping[str, Any]) -> list[list[str]]:
    """The fused groups among `schemes` (name -> any hashable scheme) whose members do not all share one:
    a runtime that concatenates them into one weight cannot load them."""
    return [group for group in fused_groups(list(schemes)) if len({schemes[n] for n in group}) > 1]
