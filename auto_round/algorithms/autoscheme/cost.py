"""Bits a layer costs under a scheme (reference cost model, `compute_layer_bits`).

    total_bits = b * numel + n_groups * (scale_bits + zp_bits)
    scale_bits = 8 for the microscaling types (mx_*: E8M0, nv_fp: E4M3), else 16 (fp16 / bf16 scales)
    zp_bits    = b for integer weights (sym included: the reference counts a zero point for every int
                 group, and our asym exports do store one), 0 for the symmetric float types
    16-bit (unquantized) layers cost 16 * numel; ignore_scale_zp_bits counts b * numel only.
ggml (GGUF) types cost exactly what the file stores: rows of in / block packed blocks of type_size bytes
(the sub-block scales and mins, d and dmin included); the caller applies llama.cpp's row fallback first.
NVFP4's one fp32 global scale per tensor is not counted (32 bits per tensor; the reference omits it too).
"""

from __future__ import annotations

import math

from ...quant.gguf.types import GGML_TYPES
from ...schemes import QuantScheme


def n_groups(scheme: QuantScheme, out_features: int, in_features: int) -> int:
    """Number of scales of an [out, in] weight: group_size g > 0 -> out * ceil(in / g); -1 -> out
    (per channel); 0 -> 1 (per tensor); (m, n) -> ceil(out / m) * ceil(in / n) (FP8 blocks)."""
    g = scheme.group_size
    if isinstance(g, tuple):
        return math.ceil(out_features / g[0]) * math.ceil(in_features / g[1])
    if g == 0:
        return 1
    if g == -1:
        return out_features
    return out_features * math.ceil(in_features / g)


def scale_zp_bits(scheme: QuantScheme) -> int:
    """Bits stored per group besides the elements: scale bits + zero-point bits."""
    scale = 8 if scheme.data_type in ("mx_fp", "mx_int", "nv_fp") else 16
    zp = scheme.bits if scheme.data_type == "int" else 0
    return scale + zp


def layer_bits(scheme: QuantScheme, out_features: int, in_features: int, ignore_scale_zp_bits: bool = False) -> int:
    """Total bits (an exact integer) of an [out, in] weight stored under `scheme`."""
    numel = out_features * in_features
    if not scheme.is_quantized:
        return 16 * numel
    if ignore_scale_zp_bits:
        return scheme.bits * numel
    if scheme.gguf is not None:
        return ggml_bits(scheme.gguf, out_features, in_features)
    return scheme.bits * numel + n_groups(scheme, out_features, in_features) * scale_zp_bits(scheme)


def ggml_bits(ggml_type: str, out_features: int, in_features: int) -> int:
    """Bits of an [out, in] weight packed as a ggml type: out * (in / block) * type_size * 8."""
    t = GGML_TYPES[ggml_type]
    if in_features % t.block:
        raise ValueError(f"{ggml_type} needs rows of a multiple of {t.block} elements, got {in_features} "
                         "(llama.cpp falls back to another type: model/gguf_mix.fallback)")
    return out_features * (in_features // t.block) * t.type_size * 8
