"""Model checks done once when quantization is set up: which block lists to walk, the usable sequence
length, and which weights are shared between modules."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from torch import nn

from .blocks import find_block_groups

logger = logging.getLogger("auto_round")


def shared_weight_ptrs(model: nn.Module) -> set[int]:
    """data_ptrs of parameters that more than one module holds (tied weights)."""
    seen, shared = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        if p.is_meta or not p.numel():
            continue
        (shared if p.data_ptr() in seen else seen).add(p.data_ptr())
    return shared


def select_block_groups(model: nn.Module, names: "str | Sequence[str] | None") -> list[str]:
    if names:
        groups = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        for g in groups:
            try:
                module = model.get_submodule(g)
            except AttributeError as err:
                raise ValueError(f"to_quant_block_names: {g!r} is not a module of this model") from err
            if not isinstance(module, nn.ModuleList):
                raise ValueError(f"to_quant_block_names: {g!r} is not a ModuleList of blocks")
        return groups
    groups = find_block_groups(model)
    if not groups:
        raise ValueError("no block list (nn.ModuleList of layers with Linear weights) found in this model")
    return groups


def clamp_seqlen(seqlen: int, model: nn.Module, tokenizer: Any) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or seqlen
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 10**8:
        limit = min(limit, tok_limit)
    if seqlen > limit:
        logger.warning("seqlen %d exceeds the model's limit %d; using %d", seqlen, limit, limit)
        return limit
    return seqlen
