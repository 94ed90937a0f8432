"""Scheme recipes: names that stand for a base scheme plus per-layer rules (the reference's special schemes).

    W4A16_MIXED   routed MoE experts W4A16 (group 128, sym), every other layer W8A16 (shared experts too):
                  experts hold most of an MoE model's weights and take 4 bits well, the rest is kept near lossless

The rules become layer_config entries placed before the user's, so the user's own keys win.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional, Sequence

from torch import nn

from .blocks import quantizable_layers

logger = logging.getLogger("auto_round")

# recipe name -> (base scheme, [(regex over layer names, scheme)])
RECIPES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "W4A16_MIXED": ("W8A16", [(r"\.experts\.", "W4A16")]),
}


def expand_scheme_recipe(scheme: Any) -> tuple[Any, list[tuple[str, str]]]:
    """(base scheme, layer rules) of a recipe name; any other scheme comes back as it is, with no rules."""
    if isinstance(scheme, str) and scheme.strip().upper() in RECIPES:
        base, rules = RECIPES[scheme.strip().upper()]
        return base, list(rules)
    return scheme, []


def recipe_layer_config(rules: list[tuple[str, str]], layer_config: Optional[dict], model: nn.Module,
                        block_groups: Sequence[str]) -> Optional[dict]:
    """layer_config with the recipe's rules first (only those matching some block layer: a dense model, or one
    whose experts transformers fuses into 3-D parameters, gets a warning instead)."""
    if not rules:
        return layer_config
    names = [n for g in block_groups for n in quantizable_layers(model.get_submodule(g), prefix=g)]
    merged: dict = {}
    for pattern, scheme in rules:
        if any(re.search(pattern, n) for n in names):
            merged[pattern] = scheme
        else:
            logger.warning("scheme recipe: no layer matches %r (a dense model, or MoE experts transformers fuses into "
                           "3-D parameters, which model_free quantizes); those layers keep the base scheme",
                           pattern)
    merged.update(layer_config or {})
    return merged
