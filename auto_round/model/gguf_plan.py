"""Which ggml type every tensor of a model gets for a GGUF preset (gguf:q4_k_m, ...).

The block Linear layers and lm_head follow llama.cpp's mix rules (model/gguf_mix.py); the token
embedding is quantized too (to the base type, or to the output type when tied to lm_head), as llama.cpp
does. Layers the user fixed (layer_config, fp_layers) keep their choice, mapped to a ggml type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from ..schemes import GGML_FLOAT_TYPES, GGUF_MIXES, QuantScheme, gguf_scheme, scheme_for_bits
from .blocks import has_tied_embeddings, input_embedding_name, layer_shape
from .gguf_mix import ModelShape, assign_gguf_types, embedding_type, fallback
from .layer_config import as_override, matches_fp_key, parse_fp_layers, resolve_layer_schemes


@dataclass
class GGUFPlan:
    """mix: the llama.cpp file type ('q4_k_m'); layer_schemes: every candidate Linear -> its ggml scheme;
    embedding: (module name, scheme) of the token embedding, None when the mix keeps it in float."""

    mix: str
    layer_schemes: dict[str, QuantScheme]
    embedding: Optional[tuple[str, QuantScheme]]

    @property
    def is_float(self) -> bool:
        return GGUF_MIXES[self.mix] in GGML_FLOAT_TYPES


def _text_config(model: nn.Module):
    config = model.config
    return getattr(config, "text_config", None) or config


def model_shape(model: nn.Module, n_layers: int) -> ModelShape:
    config = _text_config(model)
    heads = getattr(config, "num_attention_heads", None) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(n_layers=n_layers, n_gqa=max(1, heads // kv_heads))


def split_embedding_choice(model: nn.Module, layer_config: Optional[Mapping[str, Any]],
                           fp_layers: Union[str, Sequence[str], None]) -> tuple[dict, list[str], Optional[dict]]:
    """(layer_config without the embedding's exact key, fp_layers without entries matching only the embedding,
    the embedding's override dict or None). fp_layers naming the embedding give {'bits': 16} (f16)."""
    name = input_embedding_name(model)
    rest = dict(layer_config or {})
    override = as_override(rest.pop(name)) if name is not None and name in rest else None
    keys = parse_fp_layers(fp_layers)
    if name is not None and any(matches_fp_key(name, k) for k in keys):
        override = {"bits": 16}
        keys = [k for k in keys if not matches_fp_key(name, k) or _matches_linear(model, k)]
    return rest, keys, override


def _matches_linear(model: nn.Module, key: str) -> bool:
    return any(matches_fp_key(n, key) for n, m in model.named_modules() if isinstance(m, nn.Linear))


def plan_gguf(model: nn.Module, block_groups: list[str], mix: str, base: dict[str, QuantScheme], *,
              has_imatrix: bool, embedding_override: Optional[Mapping[str, Any]] = None) -> GGUFPlan:
    """base: the schemes resolve_layer_schemes gave (global gguf base scheme plus the user's overrides);
    embedding_override: the user's layer_config entry for the token embedding (bits / gguf / scheme)."""
    base_type = GGUF_MIXES[mix]
    if base_type in GGML_FLOAT_TYPES:
        return GGUFPlan(mix, {n: gguf_scheme(base_type) for n in base}, None)
    default = gguf_scheme(base_type)
    fixed = {n: (s if s.gguf is not None else gguf_scheme("f16")) for n, s in base.items() if s != default}
    layers: dict[str, tuple[int, Optional[int]]] = {}
    for name in base:
        in_features = layer_shape(model.get_submodule(name))[1]
        group = next((g for g in block_groups if name.startswith(g + ".")), None)
        index = int(name[len(group) + 1:].split(".")[0]) if group else None
        layers[name] = (in_features, index)
    n_layers = sum(len(model.get_submodule(g)) for g in block_groups)
    outside = frozenset(n for n, (_, index) in layers.items() if index is None)
    schemes = assign_gguf_types(mix, layers, model_shape(model, n_layers), outside=outside, fixed=fixed,
                                has_imatrix=has_imatrix)
    emb_name = input_embedding_name(model)
    embedding = None
    if emb_name is not None:
        hidden = model.get_submodule(emb_name).weight.shape[1]
        chosen = embedding_type(mix, has_tied_embeddings(model), hidden)
        if embedding_override is not None:
            chosen = fallback(scheme_for_bits(default, embedding_override).gguf or "f16", hidden)
        embedding = (emb_name, gguf_scheme(chosen))
    return GGUFPlan(mix, schemes, embedding)


def resolve_gguf_layers(model: nn.Module, block_groups: list[str], mix: str, scheme: QuantScheme,
                        choices: Mapping[str, Any], *, has_imatrix: bool) -> GGUFPlan:
    """The GGUFPlan of a gguf:<mix> run. choices: AutoRound's layer_config / fp_layers / quant_lm_head.

    GGUF files always quantize output.weight (an untied lm_head joins the candidates), and the token
    embedding takes the type the user's layer_config / fp_layers give it (split_embedding_choice)."""
    layer_config, fp_layers, embedding = split_embedding_choice(model, choices["layer_config"], choices["fp_layers"])
    quant_lm_head = choices["quant_lm_head"] or not has_tied_embeddings(model)
    base = resolve_layer_schemes(model, block_groups, scheme, layer_config=layer_config, fp_layers=fp_layers,
                                 quant_lm_head=quant_lm_head)
    return plan_gguf(model, block_groups, mix, base, has_imatrix=has_imatrix, embedding_override=embedding)
