"""The native `auto_round` checkpoint format (reference §4.1).

Packing by scheme:
    all quantized layers sym                     -> auto_round:auto_gptq (qzeros store zp - 1)
    asym, every quantized layer 4-bit, in % G == 0 -> auto_round:auto_awq (AWQ GEMM layout)
    anything else (other asym bits, mixed, ragged) -> auto_round         (GPTQ layout, raw zp)
    explicit auto_round:gptqmodel                  -> GPTQ layout, raw zp, g_idx tensors
    MX / NVFP4, FP8 weights                        -> auto_round:llm_compressor, auto_round:fp8_static
                                                      (export/auto_round_float.py)
Tensors per quantized integer layer: qweight, qzeros, scales (+ bias); everything else is saved as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..packing.awq import pack_awq_qweight, pack_awq_qzeros
from ..packing.gptq import pack_qweight, pack_qzeros
from ..algorithms.tunable import LayerQuantResult
from ..schemes import QuantScheme
from .auto_round_float import FLOAT_PACKINGS, check_auto_round_packing, float_packing_of, pack_auto_round_float
from .context import ExportContext
from .checkpoint import group_index, quantized_state_dict, scales_and_zeros, write_checkpoint
from .quant_config import build_quantization_config
from .writer import ExportError

logger = logging.getLogger("auto_round")

GPTQ_PACKING = "auto_round:auto_gptq"
AWQ_PACKING = "auto_round:auto_awq"
PLAIN_PACKING = "auto_round"
GPTQMODEL_PACKING = "auto_round:gptqmodel"  # GPTQ layout, raw zero points ("v2"), g_idx written
PACKINGS = (GPTQ_PACKING, AWQ_PACKING, GPTQMODEL_PACKING, PLAIN_PACKING, *FLOAT_PACKINGS)


def awq_misfits(layers: dict[str, tuple[QuantScheme, int]]) -> list[str]:
    """Names of layers (name -> (scheme, in_features)) the AWQ layout cannot hold: not 4-bit or ragged."""
    bad = []
    for name, (scheme, in_features) in layers.items():
        group = in_features if scheme.group_size <= 0 else scheme.group_size
        if scheme.bits != 4 or in_features % group:
            bad.append(name)
    return bad


def check_requested_packing(requested: str | None, layers: dict[str, tuple[QuantScheme, int]]) -> None:
    """Fail before quantizing when a forced packing cannot hold some layer."""
    if requested != AWQ_PACKING:
        return
    bad = awq_misfits(layers)
    if bad:
        scheme, in_features = layers[bad[0]]
        raise ExportError(
            f"{AWQ_PACKING} needs 4-bit layers with in_features divisible by group_size; "
            f"{bad[0]} has {scheme.bits} bits, in_features={in_features}, group_size={scheme.group_size} "
            f"({len(bad)} such layers). Use format 'auto_round'."
        )


def choose_packing_for(layers: dict[str, tuple[QuantScheme, int]], requested: str | None = None) -> str:
    """Pick the packing_format from the quantized layers (name -> (scheme, in_features)).

    `requested` "auto_round" (or None) follows the reference rules; a full packing name forces it.
    Known before tuning, so layers can be packed as soon as their block is done.
    """
    schemes = [scheme for scheme, _ in layers.values()]
    float_packings = {float_packing_of(s) for s in schemes} - {None}
    if float_packings:  # MX / NV / FP8 weights: their packing (check_auto_round_packing refused mixes)
        check_auto_round_packing(layers)
        return float_packings.pop()
    if requested and requested != PLAIN_PACKING:
        check_requested_packing(requested, layers)
        if requested == GPTQ_PACKING and not all(s.sym for s in schemes):
            logger.warning("%s with asymmetric layers: a zero point of 0 cannot be stored as zp-1", GPTQ_PACKING)
        return requested
    if all(s.sym for s in schemes):
        return GPTQ_PACKING
    if all(s.bits == 4 for s in schemes):
        if not awq_misfits(layers):
            return AWQ_PACKING
        logger.info("some layers have a ragged last group the AWQ layout cannot hold; using %s packing", PLAIN_PACKING)
    return PLAIN_PACKING


def choose_packing(ctx: ExportContext, requested: str | None = None) -> str:
    """The packing of an export: the one fixed before tuning, or chosen from the results."""
    if ctx.packing is not None:
        return ctx.packing
    return choose_packing_for({n: (r.scheme, r.layout.in_features) for n, r in ctx.results.items()}, requested)


def pack_result(name: str, res: LayerQuantResult, packing: str, scale_dtype_name: str) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales (+ g_idx for gptqmodel) of one quantized layer, in the given packing."""
    scale_dtype = torch.float16 if scale_dtype_name == "torch.float16" else torch.float32
    if packing in FLOAT_PACKINGS:
        return pack_auto_round_float(name, res, scale_dtype)
    scales, zeros = scales_and_zeros(name, res, scale_dtype)
    bits = res.scheme.bits
    if packing == AWQ_PACKING:
        return {
            f"{name}.qweight": pack_awq_qweight(res.codes, bits),
            f"{name}.qzeros": pack_awq_qzeros(zeros, bits),
            f"{name}.scales": scales,
        }
    offset = 1 if packing == GPTQ_PACKING else 0
    tensors = {
        f"{name}.qweight": pack_qweight(res.codes, bits),
        f"{name}.qzeros": pack_qzeros(zeros, bits, zero_offset=offset),
        f"{name}.scales": scales,
    }
    if packing == GPTQMODEL_PACKING:
        tensors[f"{name}.g_idx"] = group_index(res)
    return tensors


def save_auto_round(ctx: ExportContext, directory: Path, requested_packing: str | None = None) -> dict:
    """Write an auto_round checkpoint into `directory` (which must exist). Returns quantization_config."""
    packing = choose_packing(ctx, requested_packing)
    state = quantized_state_dict(ctx, lambda name, res: pack_result(name, res, packing, ctx.scale_dtype_name))
    qconfig = build_quantization_config(ctx, packing)
    write_checkpoint(ctx, directory, state, qconfig)
    logger.info("packed %d quantized layers as %s", len(ctx.results), packing)
    return qconfig
