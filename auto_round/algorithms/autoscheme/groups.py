"""Layers that must take the same option: one DP item each.

- Runtime fusion (algorithms/fused.py FUSED_SUFFIXES): q/k/v and gate/up of one parent. vLLM concatenates
  them into one weight, which holds one bit width only (reference issue #2174). `share_fused=False` drops
  these groups (AutoScheme(share_fused_layers=False)): experts and `shared_layers` are still grouped.
- MoE experts: every layer under `<block>...experts.<i>.` of one block is one group (the experts run in one
  fused kernel; the reference's build_expert_groups).
- User `shared_layers`: each entry (a tuple of regex patterns, re.search) groups, per block, the layers of
  that block matched by any of its patterns. Layers outside every block form their own "block".
Overlapping groups are merged (union-find), so a layer is in exactly one group.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

from ..fused import fused_groups
from .spec import AutoSchemeError

_EXPERTS = re.compile(r"^(.*\.experts)\.\d+\.")


def _block_of(name: str, block_groups: Sequence[str]) -> str:
    """'model.layers.3' for 'model.layers.3.self_attn.q_proj'; '' for a layer outside the blocks."""
    for g in block_groups:
        if name.startswith(g + "."):
            idx = name[len(g) + 1:].split(".", 1)[0]
            return f"{g}.{idx}"
    return ""


def _compile(pattern: str) -> "re.Pattern[str]":
    try:
        return re.compile(pattern)
    except re.error:
        return re.compile(re.escape(pattern))  # not a regex: a plain substring


def build_groups(names: Sequence[str], block_groups: Sequence[str],
                 shared_layers: Sequence[Sequence[str]] = (), share_fused: bool = True) -> list[list[str]]:
    """Partition `names` into groups (see module doc); groups and their members keep the order of `names`."""
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(group: Sequence[str]) -> None:
        roots = [find(n) for n in group]
        for r in roots[1:]:
            parent[r] = roots[0]

    for group in fused_groups(names) if share_fused else ():
        union(group)
    experts: dict[str, list[str]] = defaultdict(list)
    for n in names:
        m = _EXPERTS.match(n)
        if m:
            experts[m.group(1)].append(n)
    for group in experts.values():
        union(group)
    for entry in shared_layers or ():
        patterns = [_compile(p) for p in entry]
        per_block: dict[str, list[str]] = defaultdict(list)
        for n in names:
            if any(p.search(n) for p in patterns):
                per_block[_block_of(n, block_groups)].append(n)
        if not per_block:
            raise AutoSchemeError(f"shared_layers entry {list(entry)} matches no layer AutoScheme allocates; "
                                  f"example names: {', '.join(list(names)[:3])}")
        for group in per_block.values():
            union(group)
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(find(n), []).append(n)
    return list(out.values())
