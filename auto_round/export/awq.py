"""The `auto_awq` format: an AutoAWQ GEMM checkpoint (reference §4.3), what vLLM, SGLang and TGI load.

Per quantized layer: qweight int32 [in, out/8] (packed along out, nibbles in the AWQ order
0,2,4,6,1,3,5,7), qzeros int32 [in/G, out/8] holding raw zero points (2^(b-1) for sym), scales fp16
[in/G, out], bias fp16. Every other floating tensor is fp16 as well.

quantization_config (the reference's keys): the auto-round keys, quant_method "awq", version "gemm", bits 4,
group_size, zero_point (= asym), modules_to_not_convert (every candidate layer kept float, lm_head included),
to_quant_block_names, provider "auto-round". One scheme for
every quantized layer: the format has no per-layer settings, so mixed schemes are refused before tuning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..algorithms.tunable import LayerQuantResult
from ..packing.awq import pack_awq_qweight, pack_awq_qzeros
from ..schemes import QuantScheme
from .checkpoint import quantized_state_dict, scales_and_zeros, write_checkpoint
from .context import ExportContext
from .quant_config import base_config, export_group_size
from .writer import ExportError

logger = logging.getLogger("auto_round")


def check_awq(layers: dict[str, tuple[QuantScheme, int]], out_features: dict[str, int] | None = None) -> None:
    """Before tuning: one 4-bit integer scheme for every quantized layer, in_features % group == 0."""
    schemes = {(s.bits, s.group_size, s.sym, s.data_type) for s, _ in layers.values()}
    if len(schemes) > 1:
        raise ExportError(
            f"auto_awq stores one scheme for the whole model, but the quantized layers use {len(schemes)} "
            "(bits, group_size, sym) combinations; use format 'auto_round' for mixed schemes"
        )
    for name, (scheme, in_features) in layers.items():
        group = in_features if scheme.group_size <= 0 else scheme.group_size
        if scheme.data_type != "int" or scheme.bits != 4:
            raise ExportError(f"auto_awq holds 4-bit integer weights only; {name} is {scheme.bits}-bit {scheme.data_type}")
        if in_features % group:
            raise ExportError(f"auto_awq needs in_features divisible by group_size; {name} has in_features="
                              f"{in_features}, group_size={scheme.group_size}. Use format 'auto_round'.")
        if out_features is not None and out_features[name] % 8:
            raise ExportError(f"auto_awq needs out_features divisible by 8; {name} has {out_features[name]}")


def pack_awq_layer(name: str, res: LayerQuantResult) -> dict[str, torch.Tensor]:
    scales, zeros = scales_and_zeros(name, res, torch.float16)
    return {
        f"{name}.qweight": pack_awq_qweight(res.codes, res.scheme.bits),
        f"{name}.qzeros": pack_awq_qzeros(zeros, res.scheme.bits),
        f"{name}.scales": scales,
    }


def awq_config(ctx: ExportContext) -> dict[str, Any]:
    scheme = next(iter(ctx.results.values())).scheme
    not_converted = sorted(n for n, s in ctx.layer_schemes.items() if not s.is_quantized)  # lm_head included
    return dict(sorted({
        **base_config(ctx),
        "bits": scheme.bits,
        "group_size": export_group_size(scheme),
        "modules_to_not_convert": not_converted,
        "provider": "auto-round",
        "quant_method": "awq",
        "sym": scheme.sym,
        "to_quant_block_names": ",".join(ctx.block_groups),
        "version": "gemm",
        "zero_point": not scheme.sym,
    }.items()))


def save_auto_awq(ctx: ExportContext, directory: Path) -> dict:
    if any(not ctx.in_block(n) for n in ctx.results):
        raise ExportError("auto_awq cannot hold quantized layers outside the blocks (lm_head); use 'auto_round'")
    check_awq({n: (r.scheme, r.layout.in_features) for n, r in ctx.results.items()},
              {n: r.layout.out_features for n, r in ctx.results.items()})
    state = quantized_state_dict(ctx, pack_awq_layer, float_dtype=torch.float16)
    qconfig = awq_config(ctx)
    write_checkpoint(ctx, directory, state, qconfig, dtype=torch.float16)
    logger.info("packed %d quantized layers as AWQ GEMM", len(ctx.results))
    return qconfig
