"""The `fp8` format (reference §4.5): FP8_BLOCK as DeepSeek / transformers FineGrainedFP8 checkpoints store it.

Per quantized Linear: `weight` float8_e4m3fn [out, in] and `weight_scale_inv` fp32 [out/bm, in/bn], which despite
its name is the dequant multiplier (amax/448): W = weight * weight_scale_inv per block. Kept in fp32 (DeepSeek-V3
does too), so the dequantized weights are our fake-quant weights bit for bit.
quantization_config: quant_method "fp8", fmt "e4m3", activation_scheme "dynamic" (the runtime quantizes each
layer's input per token and group of bn, as FP8_BLOCK does), weight_block_size [bm, bn], ignored_layers (every
Linear kept in floating point).

Holds: fp8 weights in one (bm, bn) block shape for all layers, in_features a multiple of bn and out_features a
multiple of bm or smaller than one block (runtimes infer the block from the weight and scale shapes), and
dynamic fp8 activations in groups of bn (or none: weight-only FP8 blocks, which the runtime still runs with
dynamic fp8 activations, are refused).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from ..algorithms.float_tunable import FloatQuantResult
from ..layers import is_quantizable
from ..schemes import QuantScheme
from .checkpoint import quantized_state_dict, write_checkpoint
from .context import ExportContext
from .writer import ExportError

logger = logging.getLogger("auto_round")


def fp8_misfit(scheme: QuantScheme, in_features: int, out_features: Optional[int] = None) -> Optional[str]:
    """Why the fp8 format cannot hold a layer (None when it can)."""
    if scheme.data_type != "fp" or not isinstance(scheme.group_size, tuple):
        return "the fp8 format holds FP8 weights in 2-D blocks (FP8_BLOCK) only"
    bm, bn = scheme.group_size
    if in_features % bn:
        return f"in_features={in_features} is not a whole number of {bn}-column blocks"
    if out_features is not None and out_features % bm and out_features > bm:
        return f"out_features={out_features} is not a whole number of {bm}-row blocks"
    act = (scheme.act_bits, scheme.resolved_act_data_type, scheme.act_dynamic, scheme.resolved_act_group_size)
    if act != (8, "fp", True, bn):
        return (f"its runtimes quantize activations to fp8 dynamically in groups of {bn}; this layer has "
                f"act_bits={scheme.act_bits}, act_data_type={scheme.resolved_act_data_type!r}, "
                f"act_dynamic={scheme.act_dynamic}, act_group_size={scheme.resolved_act_group_size}")
    return None


def check_fp8(layers: dict[str, tuple[QuantScheme, int]], out_features: Optional[dict[str, int]] = None) -> None:
    blocks = {s.group_size for s, _ in layers.values()}
    for name, (scheme, in_features) in layers.items():
        problem = fp8_misfit(scheme, in_features, (out_features or {}).get(name))
        if problem:
            raise ExportError(f"format 'fp8' cannot hold {name}: {problem}")
    if len(blocks) > 1:
        raise ExportError(f"the fp8 format has one weight_block_size, but the layers use {sorted(blocks)}")


def pack_fp8_layer(name: str, res: FloatQuantResult) -> dict[str, torch.Tensor]:
    if res.codes is None:
        raise ExportError(f"{name}: its codes were released after packing; it cannot be packed again")
    return {f"{name}.weight": res.codes.contiguous(), f"{name}.weight_scale_inv": res.scale.float().contiguous()}


def fp8_config(ctx: ExportContext) -> dict[str, Any]:
    block = next(iter(ctx.results.values())).scheme.group_size
    ignored = sorted(name for name, module in ctx.model.named_modules()
                     if name and is_quantizable(module) and name not in ctx.results)
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "ignored_layers": ignored, "quant_method": "fp8",
            "weight_block_size": list(block)}


def save_fp8(ctx: ExportContext, directory: Path) -> dict:
    layers = {n: (r.scheme, r.layout.in_features) for n, r in ctx.results.items()}
    check_fp8(layers, {n: r.layout.out_features for n, r in ctx.results.items()})
    state = quantized_state_dict(ctx, pack_fp8_layer)
    qconfig = fp8_config(ctx)
    write_checkpoint(ctx, directory, state, qconfig)
    logger.info("packed %d layers as fp8 blocks %s", len(ctx.results), qconfig["weight_block_size"])
    return qconfig
