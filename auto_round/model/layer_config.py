"""Resolve the scheme of every quantizable layer: global scheme, layer_config, fp_layers, lm_head, shapes.

Rules (reference-compatible):
- Linear/Conv1D layers inside the block groups get the global scheme by default.
- `layer_config` keys are exact layer names or regular expressions (re.search); exact names win.
  A key that matches no layer is an error (a typo should not silently quantize everything).
- `fp_layers` is a comma list of substrings; a key ending in a digit means that exact block
  ("layers.1" matches "layers.1." but not "layers.10.").
- lm_head is quantized only with `quant_lm_head=True` or an explicit layer_config entry, and never when
  it is tied to the input embeddings (the shared tensor cannot hold two formats).
- Integer layers whose out or in features are not multiples of 32 cannot be packed; they stay in fp
  with a warning.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from ..schemes import FP_SCHEME, QuantScheme, SchemeError, resolve_scheme, scheme_for_bits
from .blocks import has_tied_embeddings, input_embedding_name, layer_shape, lm_head_name, quantizable_layers

logger = logging.getLogger("auto_round")

PACK_ALIGN = 32  # out/in multiple needed by the int32 packing of every supported bit width

LayerConfig = Mapping[str, Union[Mapping[str, Any], str, QuantScheme]]


def parse_fp_layers(fp_layers: Union[str, Sequence[str], None]) -> list[str]:
    if not fp_layers:
        return []
    items = fp_layers.split(",") if isinstance(fp_layers, str) else list(fp_layers)
    return [i.strip() for i in items if i.strip()]


def matches_fp_key(name: str, key: str) -> bool:
    if key[-1].isdigit():
        return (key + ".") in (name + ".")
    return key in name


def as_override(value: Union[Mapping[str, Any], str, QuantScheme]) -> dict[str, Any]:
    if isinstance(value, QuantScheme):
        return value.to_dict()
    if isinstance(value, str):
        return resolve_scheme(value).to_dict()
    if isinstance(value, Mapping):
        return dict(value)
    raise SchemeError(f"layer_config values must be dicts, scheme names or QuantScheme, got {type(value).__name__}")


def _match_layer_config(names: Sequence[str], layer_config: LayerConfig) -> dict[str, dict[str, Any]]:
    """name -> override dict, exact keys first, then regex keys in the order given."""
    matched: dict[str, dict[str, Any]] = {}
    for key, value in layer_config.items():
        override = as_override(value)
        if key in names:
            matched[key] = {**matched.get(key, {}), **override}
            continue
        try:
            pattern = re.compile(key)
        except re.error as err:
            raise SchemeError(f"layer_config key {key!r} is neither a layer name nor a valid regex: {err}") from err
        hits = [n for n in names if pattern.search(n)]
        if not hits:
            raise SchemeError(
                f"layer_config key {key!r} matches no quantizable layer; example names: {', '.join(names[:3])}"
            )
        for n in hits:
            if n not in layer_config:  # an exact entry always wins over a pattern
                matched[n] = {**matched.get(n, {}), **override}
    return matched


def resolve_layer_schemes(
    model: nn.Module,
    block_groups: Sequence[str],
    scheme: QuantScheme,
    *,
    layer_config: Optional[LayerConfig] = None,
    fp_layers: Union[str, Sequence[str], None] = None,
    quant_lm_head: bool = False,
) -> dict[str, QuantScheme]:
    """Scheme of every layer that is a candidate for quantization (block layers and lm_head).

    Returns name -> QuantScheme; layers that stay in floating point map to FP_SCHEME.
    """
    layers: dict[str, nn.Module] = {}
    for group in block_groups:
        layers.update(quantizable_layers(model.get_submodule(group), prefix=group))
    head = lm_head_name(model)
    layer_config = dict(layer_config or {})
    # lm_head joins only when asked for by flag or by its exact name, never through a block regex.
    head_requested = quant_lm_head or (head is not None and head in layer_config)
    if head is not None and head_requested:
        if has_tied_embeddings(model):
            logger.warning("lm_head is tied to the input embeddings; it stays in floating point")
            layer_config = {k: v for k, v in layer_config.items() if k != head}
        else:
            layers[head] = model.get_submodule(head)

    names = list(layers)
    _refuse_embedding_keys(model, names, layer_config, fp_layers)
    overrides = _match_layer_config(names, layer_config)
    fp_keys = parse_fp_layers(fp_layers)
    for key in fp_keys:
        if not any(matches_fp_key(n, key) for n in names):
            raise SchemeError(f"fp_layers entry {key!r} matches no quantizable layer")

    schemes: dict[str, QuantScheme] = {}
    for name in names:
        s = scheme_for_bits(scheme, overrides[name]) if name in overrides else scheme
        if any(matches_fp_key(name, k) for k in fp_keys):
            s = FP_SCHEME
        schemes[name] = _apply_shape_rule(name, layers[name], s)
    return schemes


def _refuse_embedding_keys(model: nn.Module, names: Sequence[str], layer_config: LayerConfig,
                           fp_layers: Union[str, Sequence[str], None]) -> None:
    """A layer_config key naming the token embedding exactly, or an fp_layers entry matching it and no layer:
    only GGUF files quantize the embedding (model/gguf_plan.py takes such keys out first), so elsewhere it is
    an error that says so, rather than "matches no quantizable layer"."""
    name = input_embedding_name(model)
    if name is None:
        return
    fp_hits = [k for k in parse_fp_layers(fp_layers)
               if matches_fp_key(name, k) and not any(matches_fp_key(n, k) for n in names)]
    if name in layer_config or fp_hits:
        raise SchemeError(f"{name!r} is the token embedding: it is quantized only in GGUF files (a gguf:* scheme, "
                          "where layer_config / fp_layers set its ggml type); other formats keep it in float")


def fixed_layer_names(names: Sequence[str], layer_config: Optional[LayerConfig] = None,
                      fp_layers: Union[str, Sequence[str], None] = None) -> set[str]:
    """The layers among `names` whose scheme the user fixed (a layer_config key or an fp_layers entry)."""
    fixed = set(_match_layer_config(list(names), dict(layer_config or {})))
    keys = parse_fp_layers(fp_layers)
    return fixed | {n for n in names if any(matches_fp_key(n, k) for k in keys)}


def apply_shape_rule(name: str, module: nn.Module, scheme: QuantScheme) -> QuantScheme:
    """`scheme`, or FP_SCHEME where the layer's shape cannot hold it (see _apply_shape_rule)."""
    return _apply_shape_rule(name, module, scheme)


def _apply_shape_rule(name: str, module: nn.Module, scheme: QuantScheme) -> QuantScheme:
    """Reference rules: int layers need in/out multiples of 32 (packing); MX / NVFP4 layers need whole
    groups along in_features; FP8 has no shape rule (ragged blocks are padded)."""
    if not scheme.is_quantized or scheme.gguf is not None:  # ggml types: gguf_mix's row-length fallback
        return scheme
    out_f, in_f = layer_shape(module)
    if scheme.data_type in ("mx_fp", "mx_int", "nv_fp"):
        if in_f % scheme.group_size:
            logger.warning("%s has in_features=%d, not a multiple of the %s group (%d); it stays in fp",
                           name, in_f, scheme.data_type, scheme.group_size)
            return FP_SCHEME
        return scheme
    if not scheme.is_int:
        return scheme
    if out_f % PACK_ALIGN or in_f % PACK_ALIGN:
        logger.warning(
            "%s has shape [out=%d, in=%d], not multiples of %d; it cannot be packed and stays in fp",
            name, out_f, in_f, PACK_ALIGN,
        )
        return FP_SCHEME
    return scheme
