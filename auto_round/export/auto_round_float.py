"""The native `auto_round` format for MX / NVFP4 / FP8 weights (reference §4.1), with activation quantization.

    mx_fp (MXFP4/6/8), nv_fp (NVFP4)   packing_format "auto_round:llm_compressor": the compressed-tensors tensors
                                       (weight_packed or weight, weight_scale, weight_global_scale)
    fp (FP8 per tensor / channel /     packing_format "auto_round:fp8_static": weight float8_e4m3fn, weight_scale
        group / 2-D block)             [out] (per tensor too: equal rows) / [out, in/G]; blocks: weight_scale_inv,
                                       the dequant multiplier [ceil(out/bm), ceil(in/bn)]
    static activations                 input_scale [1] (fp8 / int) or input_global_scale [1] (NVFP4)
quant_method stays "auto-round"; the act_* keys are written with the scheme keys (per-layer differences in
extra_config). Loaded by our FloatQuantLinear (inference/qlinear_float.py). One packing per checkpoint: the float
layers of a model must all be MX/NV or all FP8, and cannot be mixed with integer layers (use llm_compressor,
which has a format per config group, or fake).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..algorithms.float_tunable import FloatQuantResult
from ..schemes import QuantScheme
from .llm_compressor_float import pack_float_layer
from .writer import ExportError

LLMC_PACKING = "auto_round:llm_compressor"
FP8_STATIC_PACKING = "auto_round:fp8_static"
FLOAT_PACKINGS = (LLMC_PACKING, FP8_STATIC_PACKING)


def float_packing_of(scheme: QuantScheme) -> Optional[str]:
    """The auto_round packing of a float-weight scheme; None for integer (and MXINT) weights."""
    if scheme.data_type in ("mx_fp", "nv_fp"):
        return LLMC_PACKING
    if scheme.data_type == "fp" and scheme.is_quantized:
        return FP8_STATIC_PACKING
    return None


def auto_round_misfit(fmt: str, scheme: QuantScheme, in_features: int) -> Optional[str]:
    """Why the auto_round format `fmt` (or packing) cannot hold a float-weight / activation-quantized layer."""
    packing = float_packing_of(scheme)
    if packing is None:
        if scheme.data_type == "mx_int":
            return "MXINT has no auto_round layout here"
        return "integer weights with quantized activations (W8A8 / W4A4) have no auto_round layout"
    if fmt not in ("auto_round", packing):
        return f"{fmt} holds integer weights; this layer needs packing {packing}"
    if scheme.data_type in ("mx_fp", "nv_fp") and in_features % scheme.group_size:
        return f"in_features={in_features} is not a whole number of {scheme.group_size}-element groups"
    if scheme.data_type == "mx_fp" and scheme.bits == 6 and in_features % 4:
        return "MXFP6 packs four elements in three bytes; in_features must be divisible by 4"
    if scheme.quantizes_activations:
        dt = scheme.resolved_act_data_type
        if not scheme.act_dynamic and dt == "int" and not scheme.resolved_act_sym:
            return "static asymmetric int activations are not supported (no input zero point is written)"
    return None


def check_auto_round_packing(layers: dict[str, tuple[QuantScheme, int]]) -> None:
    """One packing per checkpoint: float layers all MX/NV or all FP8, and no integer layers next to them."""
    packings = {float_packing_of(s) for s, _ in layers.values()}
    if None in packings and len(packings) > 1 or len(packings - {None}) > 1:
        found = sorted(p or "integer (auto_round:auto_gptq / auto_awq)" for p in packings)
        raise ExportError(f"an auto_round checkpoint has one packing_format, but these layers need {found}; "
                          "use format 'llm_compressor' (one format per config group) or 'fake'")


def pack_auto_round_float(name: str, res: FloatQuantResult, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = pack_float_layer(name, res, scale_dtype)
    if isinstance(res.scheme.group_size, tuple):  # blocks: the DeepSeek / FP8BlockQLinear name
        tensors[f"{name}.weight_scale_inv"] = tensors.pop(f"{name}.weight_scale")
    elif res.scheme.data_type == "fp" and res.layout.n_groups == 1:
        # per channel: a 1-D [out] scale, the reference's FP8QLinear layout (compressed-tensors' is [out, 1]);
        # per tensor is written as per channel with equal scales (the config says group_size -1: loaders accept
        # only -1 or > 0), the same weights; so is a group as wide as the row (group_size >= in_features), as
        # FloatQuantLinear reads it
        key = f"{name}.weight_scale"
        tensors[key] = tensors[key].reshape(-1).expand(res.layout.out_features).contiguous()
    return tensors
