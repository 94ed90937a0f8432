"""Generic block discovery and access to quantizable layers.

A "block group" is an nn.ModuleList of decoder blocks (model.layers, transformer.h, ...). We find them
structurally rather than with per-architecture tables, so new decoder-only models work unchanged.
"""

from __future__ import annotations

from typing import Iterator

from torch import nn

from ..layers import is_quantizable, layer_shape  # noqa: F401  (re-exported for callers)

# Module paths containing these words belong to vision/audio towers; only text blocks are quantized.
_NON_TEXT_KEYS = ("vision", "visual", "image", "img", "audio", "speech", "wav")


def quantizable_layers(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Every Linear/Conv1D below `module`, keyed by full name (prefix + relative name)."""
    found = {}
    for name, sub in module.named_modules():
        if is_quantizable(sub):
            found[f"{prefix}.{name}" if prefix else name] = sub
    return found


def _has_linear(module: nn.Module) -> bool:
    return any(is_quantizable(m) for m in module.modules())


def find_block_groups(model: nn.Module, include_non_text: bool = False) -> list[str]:
    """Names of the ModuleLists that hold the model's repeated blocks, outermost only.

    A ModuleList counts when its children contain Linear layers. ModuleLists nested inside an already
    found group (e.g. MoE expert lists inside a decoder layer) are part of their block, not groups.
    """
    groups: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(g + ".") for g in groups):
            continue
        if not include_non_text and any(k in name.lower() for k in _NON_TEXT_KEYS):
            continue
        if _has_linear(module):
            groups.append(name)
    return groups


def iter_blocks(model: nn.Module, groups: list[str]) -> Iterator[tuple[str, nn.Module]]:
    """(full name, block) for every block of every group, in execution order of the groups."""
    for group in groups:
        for idx, block in enumerate(model.get_submodule(group)):
            yield f"{group}.{idx}", block


def lm_head_name(model: nn.Module) -> str | None:
    """Name of the output projection, if the model has one."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def input_embedding(model: nn.Module) -> "nn.Module | None":
    """The model's token embedding module (get_input_embeddings), or None where it has none."""
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def input_embedding_name(model: nn.Module) -> "str | None":
    """The token embedding's module name ('model.embed_tokens'), or None where the model has none."""
    embedding = input_embedding(model)
    if embedding is None:
        return None
    return next((name for name, module in model.named_modules() if module is embedding), None)


def has_tied_embeddings(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or emb is None:
        return False
    return head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
