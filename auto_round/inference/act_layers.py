"""Full per-layer schemes (weights and activations) from an auto-round quantization_config, and loading of
`auto_round:fake` checkpoints with quantized activations.

    schemes = layer_schemes_from_config(model, qconfig)   # name -> QuantScheme of every quantized layer
    convert_fake_model(model, qconfig)                      # before the weights load (meta model)
    install_act_quantizers(model)                           # after: activation qdq back on every such layer

A fake checkpoint holds the fake-quantized float weights under their usual names, so its Linear layers stay
Linear; layers with static activations get a persistent buffer `act_max` [1] the loader fills from the
checkpoint, and post_init installs the same `ActQuantizer` (forward pre-hook) the quantizer used.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from ..algorithms.act_quant import ACT_QUANTIZER_ATTR, ActQuantizer, SharedInputQdq, needs_act_calibration
from ..schemes import QuantScheme, SchemeError, normalize_data_type
from .layer_match import _in_blocks, discover_blocks, linear_layers, match_extra_config, parse_block_names

logger = logging.getLogger("auto_round")

FAKE_PACKING = "auto_round:fake"
FLOAT_PACKINGS = ("auto_round:llm_compressor", "auto_round:fp8_static")
_FIELDS = ("bits", "group_size", "sym", "data_type", "weight_block_size", "act_bits", "act_data_type",
           "act_group_size", "act_sym", "act_dynamic")


def scheme_from_entry(entry: Mapping[str, Any]) -> QuantScheme:
    """A config entry (bits, group_size, sym, data_type, weight_block_size, act_*) as a QuantScheme."""
    bits = int(entry.get("bits", 16))
    dtype, _ = normalize_data_type(entry.get("data_type", "int"))
    if bits >= 16 or (dtype == "fp" and bits != 8):
        return QuantScheme(bits=16, data_type="fp")
    group = entry.get("group_size", -1)
    block = entry.get("weight_block_size")
    kw: dict[str, Any] = dict(bits=bits, group_size=tuple(block) if block else (-1 if group is None else int(group)),
                              sym=bool(entry.get("sym", True)), data_type=dtype)
    act_bits = int(entry.get("act_bits", 16) or 16)
    if act_bits < 16:
        act_dtype = entry.get("act_data_type")
        kw.update(act_bits=act_bits, act_group_size=entry.get("act_group_size"), act_sym=entry.get("act_sym"),
                  act_dynamic=bool(entry.get("act_dynamic", True)),
                  act_data_type=None if act_dtype is None else _act_dtype(str(act_dtype)))
    return QuantScheme(**kw)


def _act_dtype(name: str) -> str:
    try:
        return normalize_data_type(name)[0]
    except SchemeError:
        return name  # activation-only names (mx_fp_rceil, nv_fp4_with_static_gs) are checked by QuantScheme


def layer_schemes_from_config(model: nn.Module, qconfig: Mapping[str, Any]) -> dict[str, QuantScheme]:
    """Scheme of every Linear / Conv1D the config quantizes (same layer rules as `layer_match.build_layer_specs`)."""
    blocks = parse_block_names(qconfig.get("block_name_to_quantize") or qconfig.get("to_quant_block_names"))
    blocks = blocks or discover_blocks(model)
    base = {k: qconfig[k] for k in _FIELDS if qconfig.get(k) is not None}
    names = list(linear_layers(model))
    overrides = match_extra_config(names, qconfig.get("extra_config") or {})
    schemes: dict[str, QuantScheme] = {}
    for name in names:
        in_block = _in_blocks(name, blocks)
        if name in overrides:
            if not in_block and "bits" not in overrides[name]:
                continue
            entry = {**base, **{k: v for k, v in overrides[name].items() if v is not None}}
        elif in_block:
            entry = base
        else:
            continue
        scheme = scheme_from_entry(entry)
        if scheme.is_quantized:
            schemes[name] = scheme
    return schemes


def convert_fake_model(model: nn.Module, qconfig: Mapping[str, Any]) -> tuple[nn.Module, list[str]]:
    """Mark every layer whose inputs the checkpoint quantizes; static ones get an `act_max` buffer to load."""
    marked = 0
    for name, scheme in layer_schemes_from_config(model, qconfig).items():
        if not scheme.quantizes_activations:
            continue
        module = model.get_submodule(name)
        if needs_act_calibration(scheme):
            module.register_buffer("act_max", torch.zeros(1, dtype=torch.float32, device=module.weight.device))
        module._auto_round_act_scheme = scheme
        marked += 1
    logger.info("auto_round: %d layers quantize their inputs (%s)", marked, FAKE_PACKING)
    return model, [FAKE_PACKING] if marked else []


def install_act_quantizers(model: nn.Module, scale_dtype: torch.dtype = torch.float16) -> int:
    """After the weights load: an ActQuantizer on every marked layer (idempotent). Returns how many.
    Layers fed the same tensor (q/k/v, gate/up) quantize it once (one `SharedInputQdq` for the model)."""
    count = 0
    shared = SharedInputQdq()
    for module in model.modules():
        scheme = getattr(module, "_auto_round_act_scheme", None)
        if scheme is None or getattr(module, ACT_QUANTIZER_ATTR, None) is not None:
            continue
        act_max = getattr(module, "act_max", None)
        if act_max is not None and act_max.is_meta:
            raise ValueError("act_max was not loaded from the checkpoint (still on the meta device)")
        quantizer = ActQuantizer(scheme, None if act_max is None else act_max.float().reshape(()),
                                 scale_dtype=scale_dtype, shared=shared)
        quantizer.install(module)  # records itself as module._auto_round_act_quantizer
        count += 1
    return count


def convert_float_model(model: nn.Module, qconfig: Mapping[str, Any], scale_dtype: torch.dtype = torch.float16
                        ) -> tuple[nn.Module, list[str]]:
    """auto_round:llm_compressor / auto_round:fp8_static: every quantized layer -> FloatQuantLinear (before loading)."""
    from ..layers import layer_shape
    from .qlinear_float import FloatQuantLinear

    packing = qconfig.get("packing_format")
    replaced = 0
    for name, scheme in layer_schemes_from_config(model, qconfig).items():
        if scheme.data_type not in ("mx_fp", "nv_fp", "fp"):
            raise NotImplementedError(f"layer {name}: data_type {scheme.data_type!r} in a {packing} checkpoint")
        module = model.get_submodule(name)
        out_f, in_f = layer_shape(module)
        weight = module.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.get_default_dtype()
        model.set_submodule(name, FloatQuantLinear(in_f, out_f, scheme, bias=getattr(module, "bias", None) is not None,
                                                   dtype=dtype, device=weight.device, scale_dtype=scale_dtype))
        replaced += 1
    logger.info("auto_round: %d layers -> FloatQuantLinear (%s)", replaced, packing)
    return model, ["auto_round:torch_float"] if replaced else []
