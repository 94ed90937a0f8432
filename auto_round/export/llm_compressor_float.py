"""compressed-tensors layouts for the float weight types and for activation-quantized schemes (reference §4.4),
what vLLM and transformers' compressed-tensors integration load.

Per quantized Linear, by weight type (W = what our fake-quant model holds, bit for bit):
    MXFP4   mxfp4-pack-quantized   weight_packed uint8 [out, in/2] (two E2M1 codes a byte, low nibble first),
                                   weight_scale uint8 [out, in/32] (E8M0 = shared exponent + 127)
    MXFP6   mxfp6-pack-quantized   weight_packed uint8 [out, 3*in/4] (four E2M3 codes in 3 bytes, little end),
                                   weight_scale uint8 [out, in/32]
    MXFP8   mxfp8-quantized        weight float8_e4m3fn [out, in], weight_scale uint8 [out, in/32]
    NVFP4   nvfp4-pack-quantized   weight_packed uint8 [out, in/2], weight_scale float8_e4m3fn [out, in/16],
                                   weight_global_scale fp32 [1] (W = e2m1 * weight_scale / weight_global_scale)
    FP8     float-quantized        weight float8_e4m3fn [out, in], weight_scale fp32: [1] per tensor,
                                   [out, 1] per channel, [out, in/G] per group, [ceil(out/bm), ceil(in/bn)] blocks
    int     int-quantized          (integer weights with quantized activations, e.g. INT8 W8A8)
                                   weight int8 [out, in] = code - 2^(b-1), weight_scale [out, n_groups] in the
                                   scale dtype, weight_zero_point int8 [out, n_groups] = zp - 2^(b-1) (asym only)
Static activation ranges become input tensors: FP8 / int `input_scale` [1] (the scale our qdq used: fp8 act_max/448,
int the full-range signed sym scale), NVFP4 `input_global_scale` [1] = 448*6/act_max.

`input_activations` tells the consumer how to quantize each layer's input at run time: dynamic per token / per
tensor / per group, or static per tensor, with the type and bits. The consumer computes dynamic scales its own way:
fp8 and NVFP4 the way we do (amax/448; e4m3(g * amax/6)), int8 per token with amax/127.5 where we use the
full-range -amax/128, MX with compressed-tensors' power-of-two rounding where we use the OCP floor (or rceil) rule.
Weights are unaffected: the stored codes and scales are read as they are.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..algorithms.float_tunable import FloatQuantResult
from ..algorithms.tunable import LayerQuantResult
from ..quant.fp8_qdq import fp8_scale
from ..quant.int_qdq import signed_extreme, sym_scale
from ..quant.nvfp_qdq import global_scale_from_amax
from ..schemes import QuantScheme
from .writer import ExportError

PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"
MXFP4_PACK_QUANTIZED = "mxfp4-pack-quantized"
MXFP6_PACK_QUANTIZED = "mxfp6-pack-quantized"
MXFP8_QUANTIZED = "mxfp8-quantized"
NVFP4_PACK_QUANTIZED = "nvfp4-pack-quantized"

_UINT8, _E4M3 = "torch.uint8", "torch.float8_e4m3fn"


# ---------------------------------------------------------------------------------------------- what fits


def ct_misfit(scheme: QuantScheme, in_features: int) -> Optional[str]:
    """Why compressed-tensors cannot hold a layer of this scheme (None when it can)."""
    if scheme.gguf is not None:
        return "ggml (GGUF) types have no compressed-tensors layout"
    dt = scheme.data_type
    if dt == "mx_int":
        return "MXINT has no compressed-tensors layout"
    if dt == "int":
        group = in_features if scheme.group_size <= 0 else scheme.group_size
        if in_features % group:
            return f"in_features={in_features} is not divisible by group_size={scheme.group_size}"
    if dt in ("mx_fp", "nv_fp") and in_features % scheme.group_size:
        return f"in_features={in_features} is not a whole number of {scheme.group_size}-element groups"
    if dt == "fp" and isinstance(scheme.group_size, int) and scheme.group_size > 0 and in_features % scheme.group_size:
        return f"in_features={in_features} is not divisible by group_size={scheme.group_size}"
    if dt == "fp" and isinstance(scheme.group_size, tuple) and in_features % scheme.group_size[1]:
        # compressed-tensors pads ragged rows of blocks, but its runtimes need whole column blocks
        return f"in_features={in_features} is not a whole number of {scheme.group_size[1]}-column blocks"
    if scheme.quantizes_activations:
        return _act_misfit(scheme, in_features)
    return None


def _act_misfit(scheme: QuantScheme, in_features: int) -> Optional[str]:
    dt = scheme.resolved_act_data_type
    group = scheme.resolved_act_group_size
    if scheme.act_dynamic and group > 0 and in_features % group:
        return (f"its activations are quantized in groups of {group}, and compressed-tensors quantizes no ragged "
                f"group (in_features={in_features})")
    if dt in ("mx_int", "nv_fp"):
        what = "MXINT activations" if dt == "mx_int" else "NVFP4 activations with a dynamic global scale"
        return f"{what} have no compressed-tensors equivalent (NVFP4 needs act_data_type 'nv_fp4_with_static_gs')"
    if dt in ("int", "fp") and not scheme.act_dynamic:
        if dt == "int" and not scheme.resolved_act_sym:
            return "static asymmetric int activations are not supported here (no input zero point is written)"
    return None


# ---------------------------------------------------------------------------------------------- config args


# formats whose decompressor (compressed-tensors 0.20) hands back bf16 weights whatever the model's dtype: a
# model in another dtype fails at its first matmul, so such a checkpoint is written and declared bf16
BF16_ONLY_FORMATS = (MXFP4_PACK_QUANTIZED, MXFP6_PACK_QUANTIZED, NVFP4_PACK_QUANTIZED, MXFP8_QUANTIZED)


def ct_format(scheme: QuantScheme) -> str:
    """The compressed-tensors format name of a layer's config group."""
    dt = scheme.data_type
    if dt == "int":
        return INT_QUANTIZED if scheme.quantizes_activations else PACK_QUANTIZED
    if dt == "mx_fp":
        return {4: MXFP4_PACK_QUANTIZED, 6: MXFP6_PACK_QUANTIZED, 8: MXFP8_QUANTIZED}[scheme.bits]
    if dt == "nv_fp":
        return NVFP4_PACK_QUANTIZED
    if dt == "fp":
        return FLOAT_QUANTIZED
    raise ExportError(f"no compressed-tensors format for data_type {dt!r}")


def _args(num_bits: int, qtype: str, strategy: str, *, group_size: Optional[int] = None, symmetric: bool = True,
          dynamic: Any = False, **extra: Any) -> dict[str, Any]:
    args = {"num_bits": num_bits, "type": qtype, "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "block_structure": None, "dynamic": dynamic, "actorder": None, "observer": None,
            "observer_kwargs": {}}
    args.update(extra)
    return args


def _granularity(group_size: int) -> tuple[str, Optional[int]]:
    if group_size == 0:
        return "tensor", None
    if group_size == -1:
        return "channel", None
    return "group", group_size


def weights_args(scheme: QuantScheme) -> dict[str, Any]:
    dt = scheme.data_type
    if dt == "int":
        strategy, group = _granularity(-1 if scheme.group_size == 0 else scheme.group_size)
        return _args(scheme.bits, "int", strategy, group_size=group, symmetric=scheme.sym, observer="minmax")
    if dt == "mx_fp":
        return _args(scheme.bits, "float", "group", group_size=32, scale_dtype=_UINT8)
    if dt == "nv_fp":
        return _args(4, "float", "tensor_group", group_size=16, scale_dtype=_E4M3)
    if isinstance(scheme.group_size, tuple):
        return _args(8, "float", "block", block_structure=list(scheme.group_size))
    strategy, group = _granularity(scheme.group_size)
    return _args(8, "float", strategy, group_size=group)


def input_args(scheme: QuantScheme) -> Optional[dict[str, Any]]:
    """`input_activations` of a layer's config group (None without activation quantization)."""
    if not scheme.quantizes_activations:
        return None
    dt, bits = scheme.resolved_act_data_type, scheme.act_bits
    if dt in ("mx_fp", "mx_fp_rceil"):
        return _args(bits, "float", "group", group_size=32, dynamic=True, scale_dtype=_UINT8)
    if dt == "nv_fp4_with_static_gs":
        return _args(4, "float", "tensor_group", group_size=16, dynamic="local", scale_dtype=_E4M3,
                     observer="static_minmax")
    if dt not in ("int", "fp"):
        raise ExportError(f"activations of type {dt!r} have no compressed-tensors equivalent")
    qtype, sym = ("int", scheme.resolved_act_sym) if dt == "int" else ("float", True)
    if not scheme.act_dynamic:  # one calibrated range for the tensor
        return _args(bits, qtype, "tensor", symmetric=sym, dynamic=False, observer="minmax")
    group = scheme.resolved_act_group_size
    if group == -1:
        return _args(bits, qtype, "token", symmetric=sym, dynamic=True)
    if group == 0:
        return _args(bits, qtype, "tensor", symmetric=sym, dynamic=True)
    return _args(bits, qtype, "group", group_size=group, symmetric=sym, dynamic=True)


# ---------------------------------------------------------------------------------------------- packing


def pack_fp4_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes [out, in] (in even) -> uint8 [out, in/2], element 2j in the low nibble."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] & 0x0F) | ((c[:, 1::2] & 0x0F) << 4)


def pack_fp6_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E2M3 codes [out, in] (in % 4 == 0) -> uint8 [out, 3*in/4]: four 6-bit codes form a little-endian
    24-bit word (first element lowest), stored as three bytes."""
    out_f, in_f = codes.shape
    c = codes.to(torch.int32).reshape(out_f, in_f // 4, 4) & 0x3F
    word = c[..., 0] | (c[..., 1] << 6) | (c[..., 2] << 12) | (c[..., 3] << 18)
    packed = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=-1)
    return packed.to(torch.uint8).reshape(out_f, 3 * in_f // 4)


def _released(name: str) -> ExportError:
    return ExportError(f"{name}: its codes were released after packing; it cannot be packed again")


def static_input_tensors(name: str, scheme: QuantScheme, act_max: Optional[torch.Tensor],
                         scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """input_scale / input_global_scale [1] fp32 of a statically quantized input (nothing for dynamic ones)."""
    dt = scheme.resolved_act_data_type
    static = scheme.quantizes_activations and (not scheme.act_dynamic or dt == "nv_fp4_with_static_gs")
    if not static:
        return {}
    if act_max is None:
        raise ExportError(f"{name}: static activation quantization without a calibrated range (act_max)")
    amax = act_max.detach().float().reshape(())
    if dt == "nv_fp4_with_static_gs":
        return {f"{name}.input_global_scale": global_scale_from_amax(amax).reshape(1)}
    if dt == "fp":
        return {f"{name}.input_scale": fp8_scale(amax).reshape(1)}
    # int sym: the scale qdq_int_sym derives from the range [-act_max, act_max] (signed, full range)
    half = 2 ** (scheme.act_bits - 1)
    scale = sym_scale(signed_extreme(-amax.reshape(1, 1), amax.reshape(1, 1)), half, scale_dtype)
    return {f"{name}.input_scale": scale.float().reshape(1)}


def pack_float_layer(name: str, res: FloatQuantResult, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one MX / NVFP4 / FP8 layer (see the module docstring). scale_dtype: the
    rounding of a static int input scale (the quantizer's scale dtype)."""
    if res.codes is None:
        raise _released(name)
    s, codes = res.scheme, res.codes
    if s.data_type == "mx_fp":
        scale = res.scale.to(torch.uint8).contiguous()
        if s.bits == 8:
            tensors = {f"{name}.weight": codes.to(torch.uint8).contiguous().view(torch.float8_e4m3fn)}
        else:
            tensors = {f"{name}.weight_packed": pack_fp4_codes(codes) if s.bits == 4 else pack_fp6_codes(codes)}
        tensors[f"{name}.weight_scale"] = scale
    elif s.data_type == "nv_fp":
        tensors = {
            f"{name}.weight_packed": pack_fp4_codes(codes),
            f"{name}.weight_scale": res.scale.float().to(torch.float8_e4m3fn).contiguous(),
            f"{name}.weight_global_scale": res.global_scale.float().reshape(1).clone(),  # fused layers share it
        }
    elif s.data_type == "fp":
        scale = res.scale.float()
        if s.group_size == 0:
            scale = scale.reshape(1)
        tensors = {f"{name}.weight": codes.contiguous(), f"{name}.weight_scale": scale.contiguous()}
    else:
        raise ExportError(f"{name}: data_type {s.data_type!r} has no compressed-tensors layout")
    tensors.update(static_input_tensors(name, s, res.act_max, scale_dtype))
    return tensors


def pack_int_quantized_layer(name: str, res: LayerQuantResult, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """int-quantized tensors of an integer layer with quantized activations (e.g. INT8 W8A8)."""
    if res.codes is None:
        raise _released(name)
    s = res.scheme
    half = 2 ** (s.bits - 1)
    out_f = res.layout.out_features

    def per_output(t: torch.Tensor) -> torch.Tensor:  # per-tensor [1, 1] -> per channel [out, 1]
        return t.expand(out_f, t.shape[1]) if t.shape[0] == 1 else t

    tensors = {
        f"{name}.weight": (res.codes.to(torch.int16) - half).to(torch.int8).contiguous(),
        f"{name}.weight_scale": per_output(res.scale).to(scale_dtype).contiguous(),
    }
    if not s.sym:
        zp = per_output(res.zero_point).round().to(torch.int16) - half
        tensors[f"{name}.weight_zero_point"] = zp.to(torch.int8).contiguous()
    tensors.update(static_input_tensors(name, s, res.act_max, scale_dtype))
    return tensors
