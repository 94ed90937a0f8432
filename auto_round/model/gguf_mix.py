"""Per-tensor ggml types of a GGUF file type ("mix"): llama.cpp's `llama_tensor_get_type` rules.

A mix such as q4_k_m names a base type (q4_k) and promotions: attn_v and ffn_down of some layers get more
bits, the output matrix gets q6_k, and a tensor whose row length (in_features) is not a multiple of the
type's block falls back to a 32-block type (or f16). The rules are ported from llama.cpp
(src/llama-quant.cpp) for the dense decoder models we export; MoE / Falcon / 70B special cases are left
out because no exported architecture reaches them.

Layer kinds come from the transformers leaf names (q_proj -> attn_q, ...), which is what llama.cpp's
converter maps to its attn_* / ffn_* tensors for the Llama family (Llama, Mistral, Qwen2/3, Gemma3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional

from ..schemes import GGML_FLOAT_TYPES, GGUF_MIXES, QuantScheme, gguf_scheme

logger = logging.getLogger("auto_round")

# transformers leaf module name -> llama.cpp tensor kind
LEAF_KIND = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
    "qkv_proj": "attn_qkv", "gate_up_proj": "ffn_up",
    "dense": "attn_output", "fc1": "ffn_up", "fc2": "ffn_down", "c_fc": "ffn_up",  # Phi-2; StarCoder2's MLP
}
# elements per ggml block along a row (in_features)
BLOCK_ELEMENTS = {"q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32,
                  "q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256}
# llama.cpp's fallback when a row is not a multiple of the type's block
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


@dataclass(frozen=True)
class ModelShape:
    """What the rules need to know about the model: block count and query heads per KV head (GQA)."""

    n_layers: int
    n_gqa: int = 1


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get a bigger type in the *_M mixes: first and last eighth,
    and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def layer_kind(name: str) -> str:
    """'model.layers.3.self_attn.v_proj' -> 'attn_v'; 'other' for leaves the rules do not name."""
    parent, _, leaf = name.rpartition(".")
    if leaf == "c_proj":  # StarCoder2's MLP output (GPT-2 style: attn.c_proj is the attention output)
        return "attn_output" if parent.endswith("attn") else "ffn_down"
    return LEAF_KIND.get(leaf, "other")


def output_type(mix: str, in_features: int) -> str:
    """Type of output.weight (and of token_embd when the two are tied)."""
    base = GGUF_MIXES[mix]
    if base in GGML_FLOAT_TYPES:
        return base
    if in_features % BLOCK_ELEMENTS[base]:
        return "q8_0"
    return "q8_0" if base == "q8_0" else "q6_k"


def embedding_type(mix: str, tied: bool, in_features: int) -> str:
    """Type of token_embd.weight: the base type, or the output type when tied to the lm_head."""
    return fallback(output_type(mix, in_features) if tied else GGUF_MIXES[mix], in_features)


def block_layer_type(mix: str, kind: str, i_layer: int, shape: ModelShape, has_imatrix: bool = False) -> str:
    """Type of one block Linear before the shape fallback (llama_tensor_get_type_impl, dense models).

    has_imatrix: the weights are quantized with an importance matrix (opt-RTN / tuning); llama.cpp then
    guards the first ffn_down layers of q4_0 / q5_0 with the _1 type."""
    base = GGUF_MIXES[mix]
    n = shape.n_layers
    if kind == "attn_v":
        if mix == "q2_k_s" and shape.n_gqa >= 4:
            return "q4_k"
        if mix == "q3_k_m":
            return "q5_k" if i_layer < 2 else "q4_k"
        if mix == "q3_k_l":
            return "q5_k"
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, n):
            return "q6_k"
        if mix == "q4_k_s" and i_layer < 4:
            return "q5_k"
        return base
    if kind == "ffn_down":
        if mix == "q2_k_s":
            return "q4_k" if i_layer < n // 8 else base
        if mix == "q3_k_m":
            return "q5_k" if i_layer < n // 16 else "q4_k"
        if mix == "q3_k_l":
            return "q5_k"
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, n):
            return "q6_k"
        if mix == "q4_k_s" and i_layer < n // 8:
            return "q5_k"
        if mix in ("q4_0", "q5_0") and has_imatrix and i_layer < n // 8:
            return "q4_1" if mix == "q4_0" else "q5_1"
        return base
    if kind == "attn_output":
        if mix == "q3_k_m":
            return "q4_k"
        if mix == "q3_k_l":
            return "q5_k"
        return base
    if kind == "attn_qkv":
        return {"q3_k_m": "q4_k", "q3_k_l": "q4_k", "q4_k_m": "q5_k", "q5_k_m": "q6_k"}.get(mix, base)
    return base


def fallback(ggml_type: str, in_features: int) -> str:
    """llama.cpp's tensor_type_fallback: a type whose block divides the row, else f16."""
    if ggml_type in GGML_FLOAT_TYPES or in_features % BLOCK_ELEMENTS[ggml_type] == 0:
        return ggml_type
    chosen = FALLBACK.get(ggml_type, ggml_type)
    if in_features % BLOCK_ELEMENTS[chosen]:
        chosen = "f16"
    return chosen


def assign_gguf_types(
    mix: str,
    layers: Mapping[str, tuple[int, Optional[int]]],
    shape: ModelShape,
    *,
    outside: frozenset = frozenset(),
    fixed: Mapping[str, QuantScheme] = {},
    has_imatrix: bool = False,
) -> dict[str, QuantScheme]:
    """name -> scheme for every candidate Linear of a GGUF mix.

    layers: name -> (in_features, block index or None for layers outside the blocks, i.e. lm_head);
    outside: names of output layers (get the output type); fixed: user-chosen schemes that win over the
    rules (still subject to the shape fallback).
    """
    schemes: dict[str, QuantScheme] = {}
    fallbacks: dict[tuple[str, str, int], int] = {}
    for name, (in_features, index) in layers.items():
        if name in fixed:
            chosen = fixed[name].gguf or "f16"
        elif name in outside or index is None:
            chosen = output_type(mix, in_features)
        else:
            chosen = block_layer_type(mix, layer_kind(name), index, shape, has_imatrix)
        final = fallback(chosen, in_features)
        if final != chosen:
            fallbacks[(chosen, final, in_features)] = fallbacks.get((chosen, final, in_features), 0) + 1
        schemes[name] = gguf_scheme(final)
    for (chosen, final, in_features), count in fallbacks.items():  # one line per kind, as llama-quantize's summary
        logger.warning("%d tensor(s) with rows of %d elements (not a multiple of %d for %s) fall back to %s",
                       count, in_features, BLOCK_ELEMENTS[chosen], chosen, final)
    return schemes
