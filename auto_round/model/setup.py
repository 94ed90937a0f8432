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


def warn_unquantized_block_weights(model: nn.Module, block_groups: Sequence[str], layer_names: Sequence[str]) -> float:
    """Warn about weight matrices inside the blocks that belong to no candidate layer (so they stay in their float
    dtype whatever the scheme): e.g. MoE experts that transformers >= 5 stores fused as 3-D parameters
    ([experts, out, in], not nn.Linear modules). Norm vectors and biases (1-D) are not counted. Returns their share
    of the block weights (0 when there are none)."""
    owned = tuple(f"{n}." for n in layer_names)
    total, left = 0, []
    for group in block_groups:
        for name, p in model.get_submodule(group).named_parameters(prefix=group):
            if p.dim() < 2:
                continue
            total += p.numel()
            if not name.startswith(owned):
                left.append((name, tuple(p.shape), p.numel()))
    if not left or not total:
        return 0.0
    share = sum(n for *_, n in left) / total
    fused = any(len(shape) >= 3 for _, shape, _ in left)
    logger.warning("%d weight tensor(s) inside the blocks are not Linear layers and stay unquantized: %s%s (%.1f %% of "
                   "the block weights)%s", len(left),
                   ", ".join(f"{n} {list(s)}" for n, s, _ in left[:3]), " ..." if len(left) > 3 else "", 100 * share,
                   "; fused MoE experts (3-D parameters, transformers >= 5) are not quantized yet" if fused else "")
    return share
