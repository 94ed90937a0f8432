"""Which layers of a loaded model are quantized, and how, according to a checkpoint's quantization_config.

Rules (reference §4.1 / §5.1):
- Linear and transformers `Conv1D` layers inside the blocks named by `block_name_to_quantize` (a comma string or a
  list, possibly nested, of module-list paths such as "model.layers") get the global scheme.
- `extra_config` maps an exact layer name or a regex to overrides of bits / group_size / sym / data_type. Exact names
  win over regexes; regexes are tried with re.search (so ".*fc1.*" and "fc1" both work) in the order given.
- bits >= 16 (or a float data_type) means the layer stays a plain float layer.
- Layers outside the blocks (e.g. lm_head) are quantized only when an extra_config entry gives them bits < 16.
- GPTQ configs: `dynamic` (GPTQModel's "+:regex" / "-:regex" rules), `modules_in_block_to_quantize` and the
  `lm_head` flag; AWQ configs: `modules_to_not_convert`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Mapping, Optional

from torch import nn

from ..layers import is_quantizable
from ..model.safetensors_header import CheckpointError

logger = logging.getLogger("auto_round")

INT_DATA_TYPES = ("int", "int_sym", "int_asym", "<class 'int'>")  # spellings of the integer grid seen in configs
FLOAT_DATA_TYPES = ("fp", "float", "bf16", "fp16", "float16", "bfloat16")


@dataclass(frozen=True)
class LayerQuantSpec:
    """Weight quantization of one layer as stored in the checkpoint."""

    bits: int
    group_size: int
    sym: bool
    data_type: str = "int"

    @property
    def is_quantized(self) -> bool:
        """False for layers kept in floating point (bits >= 16 or a float data type)."""
        return self.bits < 16 and self.data_type not in FLOAT_DATA_TYPES


def config_to_dict(qconfig: Any) -> dict[str, Any]:
    """quantization_config as a plain dict, whether it is a dict or a transformers config object.

    transformers keeps `quant_method` as a QuantizationMethod enum (str(enum) is "QuantizationMethod.AUTOROUND"),
    so enum values are replaced by their plain value.
    """
    if qconfig is None:
        raise CheckpointError("model.config has no quantization_config; this is not a quantized checkpoint")
    if isinstance(qconfig, Mapping):
        out = dict(qconfig)
    elif hasattr(qconfig, "to_dict"):
        out = dict(qconfig.to_dict())
    else:
        out = dict(vars(qconfig))
    return {k: getattr(v, "value", v) if isinstance(v, Enum) else v for k, v in out.items()}


def parse_block_names(value: Any) -> list[str]:
    """'model.layers,visual.blocks' / ['model.layers'] / [['model.layers']] -> ['model.layers', ...]."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    names: list[str] = []
    for item in value:
        names.extend(parse_block_names(item))
    return names


def discover_blocks(model: nn.Module) -> list[str]:
    """Fallback when the config names no blocks: the ModuleList holding the most Linear layers.

    GPTQ / AWQ configs do not name their blocks; in decoder LLMs the decoder-layer list wins by far.
    """
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(1 for m in module.modules() if is_quantizable(m))
            if count > best_count:
                best, best_count = name, count
    return [best] if best else []


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear / Conv1D of the model by full name, in module order."""
    return {name: m for name, m in model.named_modules() if name and is_quantizable(m)}


def _in_blocks(name: str, blocks: Iterable[str]) -> bool:
    return any(name.startswith(block + ".") for block in blocks)


def match_extra_config(names: list[str], extra_config: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Layer name -> merged overrides. Exact keys first (they always win), then regex keys in config order."""
    name_set = set(names)
    matched: dict[str, dict[str, Any]] = {}
    for key, override in extra_config.items():
        if key in name_set:
            continue
        try:
            pattern = re.compile(key)
        except re.error:
            logger.warning("extra_config key %r is neither a layer name nor a valid regex; ignored", key)
            continue
        hits = [n for n in names if pattern.search(n)]
        if not hits:
            # The reference also tolerates stale keys (e.g. layers removed from the graph); say so and go on.
            logger.debug("extra_config key %r matches no Linear layer", key)
        for n in hits:
            matched[n] = {**matched.get(n, {}), **dict(override)}
    for key, override in extra_config.items():
        if key in name_set:
            matched[key] = {**matched.get(key, {}), **dict(override)}
    return matched


def _spec(base: Mapping[str, Any], override: Mapping[str, Any]) -> LayerQuantSpec:
    merged = {**base, **{k: v for k, v in override.items() if v is not None}}
    bits = int(merged.get("bits", 16))
    data_type = str(merged.get("data_type", "int"))
    group_size = merged.get("group_size", -1)
    return LayerQuantSpec(
        bits=bits,
        group_size=-1 if group_size is None else int(group_size),
        sym=bool(merged.get("sym", True)),
        data_type=data_type,
    )


def _gptq_modules_in_block(qconfig: Mapping[str, Any]) -> Optional[set[str]]:
    """GPTQ's `modules_in_block_to_quantize` ([[names relative to a block], ...]) flattened, or None."""
    value = qconfig.get("modules_in_block_to_quantize")
    if not value:
        return None
    flat: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            flat.add(item)
        else:
            stack.extend(item)
    return flat


def gptq_dynamic(names: list[str], dynamic: Optional[Mapping[str, Any]]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """GPTQModel's per-layer `dynamic` rules -> (layer name -> overrides, names kept float).

    Keys are regexes matched with re.match against the full layer name: "-:<regex>" keeps the layer float,
    "+:<regex>" or a bare regex overrides bits / group_size / sym. The first matching rule decides.
    """
    overrides: dict[str, dict[str, Any]] = {}
    skipped: set[str] = set()
    if not dynamic:
        return overrides, skipped
    rules = []
    for key, value in dynamic.items():
        sign, pattern = ("-", key[2:]) if key.startswith("-:") else ("+", key[2:] if key.startswith("+:") else key)
        try:
            rules.append((sign, re.compile(pattern), dict(value or {})))
        except re.error:
            logger.warning("dynamic key %r is not a valid regex; ignored", key)
    for name in names:
        for sign, pattern, value in rules:
            if pattern.match(name):
                if sign == "-":
                    skipped.add(name)
                else:
                    overrides[name] = value
                break
    return overrides, skipped


def build_layer_specs(model: nn.Module, qconfig: Mapping[str, Any]) -> dict[str, LayerQuantSpec]:
    """Spec of every Linear/Conv1D that the checkpoint stores quantized (float layers are left out)."""
    blocks = parse_block_names(qconfig.get("block_name_to_quantize") or qconfig.get("to_quant_block_names"))
    if not blocks:
        blocks = discover_blocks(model)
        logger.info("quantization_config names no blocks; using %s", blocks)
    for block in blocks:
        try:
            model.get_submodule(block)
        except AttributeError as err:
            raise CheckpointError(f"block_name_to_quantize names {block!r}, which this model does not have") from err

    base = {k: qconfig.get(k) for k in ("bits", "group_size", "sym", "data_type")}
    base = {k: v for k, v in base.items() if v is not None}
    layers = linear_layers(model)
    names = list(layers)
    overrides = match_extra_config(names, qconfig.get("extra_config") or {})
    dynamic_overrides, dynamic_skipped = gptq_dynamic(names, qconfig.get("dynamic"))
    for name, override in dynamic_overrides.items():
        overrides[name] = {**overrides.get(name, {}), **override}
    in_block_filter = _gptq_modules_in_block(qconfig)
    excluded = set(qconfig.get("modules_to_not_convert") or [])  # AWQ configs list float layers this way

    specs: dict[str, LayerQuantSpec] = {}
    for name in names:
        in_block = _in_blocks(name, blocks)
        if name in dynamic_skipped:
            continue
        if name in overrides:
            if not in_block and "bits" not in overrides[name]:
                continue  # a regex tweaking e.g. group_size does not pull lm_head into quantization
            spec = _spec(base, overrides[name])
        elif in_block:
            if in_block_filter is not None and not any(name.endswith("." + m) for m in in_block_filter):
                continue
            spec = _spec(base, {})
        elif name.split(".")[-1] == "lm_head" and qconfig.get("lm_head") is True:  # GPTQ's lm_head flag
            spec = _spec(base, {})
        else:
            continue
        if any(part in excluded for part in name.split(".")) or name in excluded:
            continue
        if spec.is_quantized:
            specs[name] = spec
    return specs

