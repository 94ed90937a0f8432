"""The native `auto_round` checkpoint format (reference §4.1).

Packing by scheme:
    all quantized layers sym                     -> auto_round:auto_gptq (qzeros store zp - 1)
    asym, every quantized layer 4-bit, in % G == 0 -> auto_round:auto_awq (AWQ GEMM layout)
    anything else (other asym bits, mixed, ragged) -> auto_round         (GPTQ layout, raw zp)
Tensors per quantized layer: qweight, qzeros, scales (+ bias); everything else is saved as it is.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from ..packing.awq import pack_awq_qweight, pack_awq_qzeros
from ..packing.gptq import pack_qweight, pack_qzeros
from ..algorithms.tunable import LayerQuantResult
from ..schemes import QuantScheme
from .context import ExportContext
from .quant_config import build_quantization_config
from .writer import (
    ExportError,
    save_generation_config,
    save_tokenizer,
    tied_parameter_names,
    write_safetensors,
)

logger = logging.getLogger("auto_round")

GPTQ_PACKING = "auto_round:auto_gptq"
AWQ_PACKING = "auto_round:auto_awq"
PLAIN_PACKING = "auto_round"
PACKINGS = (GPTQ_PACKING, AWQ_PACKING, PLAIN_PACKING)


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


def _per_output(tensor: torch.Tensor, out_features: int) -> torch.Tensor:
    """[rows, n_groups] -> [out, n_groups]; rows == 1 for per-tensor schemes."""
    return tensor.expand(out_features, tensor.shape[1]) if tensor.shape[0] == 1 else tensor


def pack_result(name: str, res: LayerQuantResult, packing: str, scale_dtype_name: str) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales of one quantized layer, in the given packing."""
    if res.codes is None:
        raise ExportError(f"{name}: its integer codes were released after packing; it cannot be packed again")
    bits, out_f = res.scheme.bits, res.layout.out_features
    scales = _per_output(res.scale, out_f).t().contiguous()  # [n_groups, out]
    zeros = _per_output(res.zero_point, out_f).t().round().to(torch.int64)  # [n_groups, out]
    scales = scales.to(torch.float16) if scale_dtype_name == "torch.float16" else scales
    if packing == AWQ_PACKING:
        return {
            f"{name}.qweight": pack_awq_qweight(res.codes, bits),
            f"{name}.qzeros": pack_awq_qzeros(zeros, bits),
            f"{name}.scales": scales,
        }
    offset = 1 if packing == GPTQ_PACKING else 0
    return {
        f"{name}.qweight": pack_qweight(res.codes, bits),
        f"{name}.qzeros": pack_qzeros(zeros, bits, zero_offset=offset),
        f"{name}.scales": scales,
    }


def quantized_state_dict(ctx: ExportContext, packing: str) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized layer's weight replaced by its packed tensors."""
    tied = tied_parameter_names(ctx.model)
    state = {k: v for k, v in ctx.model.state_dict().items() if k not in tied}
    for name in ctx.results:
        weight_key = f"{name}.weight"
        if weight_key not in state:
            raise ExportError(f"quantized layer {name} has no weight in the state dict (tied or renamed?)")
        del state[weight_key]
        packed = ctx.packed.get(name)
        state.update(packed if packed is not None else pack_result(name, ctx.results[name], packing, ctx.scale_dtype_name))
    return state


def save_auto_round(ctx: ExportContext, directory: Path, requested_packing: str | None = None) -> dict:
    """Write an auto_round checkpoint into `directory` (which must exist). Returns quantization_config."""
    packing = choose_packing(ctx, requested_packing)
    state = quantized_state_dict(ctx, packing)
    qconfig = build_quantization_config(ctx, packing)
    config = copy.deepcopy(ctx.model.config)
    config.quantization_config = qconfig
    config.save_pretrained(str(directory))
    (directory / "quantization_config.json").write_text(json.dumps(qconfig, indent=2))
    write_safetensors(state, directory, ctx.max_shard_size)
    save_generation_config(ctx.model, directory)
    save_tokenizer(ctx.tokenizer, directory)
    logger.info("packed %d quantized layers as %s", len(ctx.results), packing)
    return qconfig
