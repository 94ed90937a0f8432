"""Exact knapsack: one option per item, minimum summed loss, total bits <= budget.

Dynamic programming over a Pareto front of partial assignments: after item i the front holds, for each
reachable total of bits, the lowest summed loss, and only states whose loss strictly decreases as bits
increase (a state with more bits and no lower loss can never be better). Totals are exact integers, so
the budget is never exceeded by rounding. Two prunings keep it exact and small:
- a state that cannot be completed within the budget (bits + cheapest rest > budget) is dropped;
- among states for which every completion fits (bits + dearest rest <= budget) only the one with the
  lowest loss is kept: their futures are identical.
Real models repeat a few layer shapes, so the number of distinct totals (the front) stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Item:
    """One decision: `costs[k]` bits (int) and `losses[k]` (>= 0) if option k is taken."""

    name: str
    costs: tuple[int, ...]
    losses: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.costs) != len(self.losses) or not self.costs:
            raise ValueError(f"item {self.name!r}: costs and losses must be non-empty and of equal length")


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]  # option index per item
    total_bits: int
    total_loss: float


class InfeasibleBudget(ValueError):
    """Even the cheapest option of every item exceeds the budget."""


def _pareto(bits: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the states kept: sorted by bits, loss strictly decreasing (ties: lowest loss first)."""
    order = np.lexsort((loss, bits))
    l = loss[order]
    running = np.minimum.accumulate(l)
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = l[1:] < running[:-1]
    return order[keep]


def solve(items: Sequence[Item], budget: int) -> Solution:
    """The min-loss choice of one option per item with sum of costs <= budget (exact, see module doc)."""
    budget = int(budget)
    mins = [min(it.costs) for it in items]
    maxs = [max(it.costs) for it in items]
    rest_min = np.concatenate([np.cumsum(mins[::-1])[::-1], [0]]).tolist()  # cheapest completion after item i
    rest_max = np.concatenate([np.cumsum(maxs[::-1])[::-1], [0]]).tolist()
    if rest_min[0] > budget:
        raise InfeasibleBudget(f"the cheapest assignment needs {rest_min[0]} bits, more than the budget {budget}")
    bits = np.zeros(1, dtype=np.int64)
    loss = np.zeros(1, dtype=np.float64)
    back: list[tuple[np.ndarray, np.ndarray]] = []  # per item: (parent state index, option) of each state
    for i, it in enumerate(items):
        costs = np.asarray(it.costs, dtype=np.int64)
        losses = np.asarray(it.losses, dtype=np.float64)
        k = len(costs)
        nb = (bits[:, None] + costs[None, :]).reshape(-1)  # [states * k]
        nl = (loss[:, None] + losses[None, :]).reshape(-1)
        parent = np.repeat(np.arange(len(bits)), k)
        option = np.tile(np.arange(k), len(bits))
        ok = nb + rest_min[i + 1] <= budget
        nb, nl, parent, option = nb[ok], nl[ok], parent[ok], option[ok]
        free = nb + rest_max[i + 1] <= budget  # every completion fits: keep the best of these only
        if free.sum() > 1:
            best = np.flatnonzero(free)[np.argmin(nl[free])]
            keep = ~free
            keep[best] = True
            nb, nl, parent, option = nb[keep], nl[keep], parent[keep], option[keep]
        idx = _pareto(nb, nl)
        bits, loss = nb[idx], nl[idx]
        back.append((parent[idx], option[idx]))
    best = int(np.argmin(loss))  # np.argmin: the first (lowest bits) among equal losses
    choice = []
    state = best
    for parent, option in reversed(back):
        choice.append(int(option[state]))
        state = int(parent[state])
    choice.reverse()
    total = sum(it.costs[c] for it, c in zip(items, choice))
    assert total <= budget, "knapsack solution over budget"  # cannot happen: states over budget are dropped
    return Solution(choice=tuple(choice), total_bits=int(total), total_loss=float(loss[best]))
