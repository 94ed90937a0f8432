"""The `auto_gptq` format: a GPTQ v1 checkpoint (reference §4.2), what GPTQModel, vLLM and TGI load.

Per quantized layer: qweight int32 [in*b/32, out] (packed along in; 3-bit in the classic 32-values-in-
3-words stream), qzeros int32 [n_groups, out*b/32] holding zp - 1 (GPTQ v1), scales fp16 [n_groups, out],
g_idx int32 [in] = i // group (no act-order), bias fp16. Every other floating tensor is fp16 as well.

quantization_config (the reference's keys): the auto-round keys (bits / group_size / sym / data_type of the main
scheme, autoround_version, non-default tuning settings), quant_method "gptq", desc_act false, true_sequential
false, damp_percent 0.01, lm_head, provider "auto-round"; per-layer differences in
GPTQModel's `dynamic` ("+:<regex>": {bits, group_size, sym} for a quantized layer, "-:<regex>": {} for a
float one), and `modules_in_block_to_quantize` when some layer inside the blocks stays float.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..algorithms.tunable import LayerQuantResult
from ..packing.gptq import pack_qweight, pack_qzeros
from ..schemes import QuantScheme
from .checkpoint import group_index, quantized_state_dict, scales_and_zeros, write_checkpoint
from .context import ExportContext
from .quant_config import base_config, export_group_size
from .writer import ExportError

logger = logging.getLogger("auto_round")

GPTQ_BITS = (2, 3, 4, 8)


def check_gptq(layers: dict[str, tuple[QuantScheme, int]]) -> None:
    """Before tuning: every quantized layer (name -> (scheme, in_features)) must fit GPTQ."""
    for name, (scheme, _) in layers.items():
        if scheme.data_type != "int" or scheme.bits not in GPTQ_BITS:
            raise ExportError(
                f"auto_gptq holds {', '.join(map(str, GPTQ_BITS))}-bit integer weights; {name} is "
                f"{scheme.bits}-bit {scheme.data_type}. Use format 'auto_round' (any bits 2-8)."
            )
    if any(not scheme.sym for scheme, _ in layers.values()):
        logger.warning("auto_gptq with asymmetric layers: GPTQ v1 stores zp - 1, and several GPTQ kernels are known "
                       "to lose accuracy on asymmetric checkpoints; 'auto_round' or 'auto_awq' keep raw zero points")


def pack_gptq_layer(name: str, res: LayerQuantResult) -> dict[str, torch.Tensor]:
    scales, zeros = scales_and_zeros(name, res, torch.float16)
    bits = res.scheme.bits
    return {
        f"{name}.qweight": pack_qweight(res.codes, bits),
        f"{name}.qzeros": pack_qzeros(zeros, bits, zero_offset=1),
        f"{name}.scales": scales,
        f"{name}.g_idx": group_index(res),
    }


def _exact(name: str) -> str:
    return "^" + re.escape(name) + "$"


def _scheme_keys(scheme: QuantScheme) -> dict[str, Any]:
    return {"bits": scheme.bits, "group_size": export_group_size(scheme), "sym": scheme.sym}


def gptq_config(ctx: ExportContext) -> dict[str, Any]:
    base = _scheme_keys(ctx.scheme)
    dynamic: dict[str, dict] = {}
    quantized_rel: set[str] = set()
    some_in_block_float = False
    for name, scheme in ctx.layer_schemes.items():
        in_block = ctx.in_block(name)
        if scheme.is_quantized:
            if _scheme_keys(scheme) != base:
                dynamic["+:" + _exact(name)] = _scheme_keys(scheme)
            if in_block:
                quantized_rel.add(_relative_name(name, ctx.block_groups))
        elif in_block:
            some_in_block_float = True
            dynamic["-:" + _exact(name)] = {}
    config: dict[str, Any] = {
        **base_config(ctx),  # the auto-round keys (data_type, version, non-default tuning settings)
        **base,
        "damp_percent": 0.01,
        "desc_act": False,
        "lm_head": any(not ctx.in_block(n) for n, s in ctx.layer_schemes.items() if s.is_quantized),
        "provider": "auto-round",
        "quant_method": "gptq",
        "true_sequential": False,
    }
    if dynamic:
        config["dynamic"] = dynamic
    if some_in_block_float:
        config["modules_in_block_to_quantize"] = [sorted(quantized_rel)]
    return dict(sorted(config.items()))


def _relative_name(name: str, block_groups: list[str]) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj' (the name inside its block)."""
    for group in block_groups:
        if name.startswith(group + "."):
            return name[len(group) + 1 :].split(".", 1)[1]
    return name


def save_auto_gptq(ctx: ExportContext, directory: Path) -> dict:
    check_gptq({n: (r.scheme, r.layout.in_features) for n, r in ctx.results.items()})
    state = quantized_state_dict(ctx, pack_gptq_layer, float_dtype=torch.float16)
    qconfig = gptq_config(ctx)
    write_checkpoint(ctx, directory, state, qconfig, dtype=torch.float16)
    logger.info("packed %d quantized layers as GPTQ v1", len(ctx.results))
    return qconfig
