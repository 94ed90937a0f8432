"""FloatQuantLinear: MX / NVFP4 / FP8 weights with the reference dequantization, and the layer's activation qdq.

Buffers, as the `auto_round:llm_compressor` and `auto_round:fp8_static` checkpoints store them (the same tensors as
compressed-tensors, export/llm_compressor_float.py), so transformers' loader fills them in place:

    MXFP4 / MXFP6   weight_packed uint8 [out, in/2] / [out, 3*in/4],  weight_scale uint8 [out, in/32] (E8M0)
    MXFP8           weight float8_e4m3fn [out, in],                   weight_scale uint8 [out, in/32]
    NVFP4           weight_packed uint8 [out, in/2], weight_scale float8_e4m3fn [out, in/16], weight_global_scale [1]
    FP8             weight float8_e4m3fn [out, in], weight_scale fp32 ([out, 1] / [out, in/G]) or, for
                    2-D blocks, weight_scale_inv fp32 [ceil(out/bm), ceil(in/bn)] (the dequant multiplier)
    static inputs   input_scale fp32 [1] (fp8 / int) or input_global_scale fp32 [1] (NVFP4)

    W = decode(codes) * 2^(e8m0 - 127)         (MX)
    W = e2m1(codes) * (scale / global_scale)   (NVFP4)
    W = fp8 * scale                            (FP8, per tensor / channel / group / block)

The input x is quantize-dequantized first: with the stored static scale (fp8: fp8(clamp(x / s)) * s; int: the
full-range sym grid of s; NVFP4: per-16 e4m3 scales under the stored global scale), or dynamically from x. This is
the qdq the quantizer ran, so the loaded layer computes what the fake-quantized one did. The dequantized weight
is computed in fp32 once (post_init) and cached in the compute dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.float_tunable import float_layout
from ..quant.act_qdq import act_layout, qdq_act
from ..quant.mx_qdq import dequant_mx, get_mx_format
from ..quant.nvfp_qdq import dequant_nvfp4, qdq_nvfp4
from ..schemes import QuantScheme


def unpack_fp4_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [out, in/2] -> uint8 codes [out, in] (low nibble first)."""
    low, high = packed & 0x0F, (packed >> 4) & 0x0F
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


def unpack_fp6_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [out, 3*in/4] -> uint8 codes [out, in] (four codes per little-endian 24-bit word)."""
    b = packed.to(torch.int32).reshape(packed.shape[0], -1, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    codes = torch.stack([(word >> shift) & 0x3F for shift in (0, 6, 12, 18)], dim=-1)
    return codes.reshape(packed.shape[0], -1)[:, :in_features].to(torch.uint8)


def needs_static_input(scheme: QuantScheme) -> Optional[str]:
    """The name of the stored static input scale of a scheme, or None (weight-only or dynamic activations)."""
    if not scheme.quantizes_activations:
        return None
    if scheme.resolved_act_data_type == "nv_fp4_with_static_gs":
        return "input_global_scale"
    return None if scheme.act_dynamic else "input_scale"


class FloatQuantLinear(nn.Module):
    """A Linear with MX / NVFP4 / FP8 weights and its scheme's activation qdq (module docstring)."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False,
                 dtype: Optional[torch.dtype] = None, device=None, scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.dtype = dtype or torch.get_default_dtype()
        self.scale_dtype = scale_dtype  # rounding of dynamic int activation scales
        self.layout = float_layout(scheme, out_features, in_features)
        dt, bits = scheme.data_type, scheme.bits
        rows, n_groups = self.layout.rows, self.layout.n_groups

        def buf(name, shape, dtype_):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype_, device=device))

        self._stores_weight = dt == "fp" or (dt == "mx_fp" and bits == 8)
        if dt == "mx_fp":
            if bits == 8:
                buf("weight", (out_features, in_features), torch.float8_e4m3fn)
            else:
                buf("weight_packed", (out_features, in_features // 2 if bits == 4 else 3 * in_features // 4),
                    torch.uint8)
            buf("weight_scale", (out_features, n_groups), torch.uint8)
        elif dt == "nv_fp":
            buf("weight_packed", (out_features, in_features // 2), torch.uint8)
            buf("weight_scale", (out_features, n_groups), torch.float8_e4m3fn)
            buf("weight_global_scale", (1,), torch.float32)
        elif dt == "fp":
            buf("weight", (out_features, in_features), torch.float8_e4m3fn)
            if isinstance(scheme.group_size, tuple):
                buf("weight_scale_inv", (rows, n_groups), torch.float32)
            elif n_groups == 1:  # per channel / per tensor: auto_round:fp8_static stores [out] (the reference's)
                buf("weight_scale", (rows,), torch.float32)
            else:
                buf("weight_scale", (rows, n_groups), torch.float32)
        else:
            raise ValueError(f"FloatQuantLinear holds mx_fp / nv_fp / fp weights, not {dt!r}")
        static = needs_static_input(scheme)
        if static:
            buf(static, (1,), torch.float32)
        if bias:
            buf("bias", (out_features,), self.dtype)
        else:
            self.bias = None
        self._dq: Optional[torch.Tensor] = None  # cached dequantized weight [out, in]
        if not self._stores_weight:  # model init code may look at `.weight`; never saved
            self.register_buffer("weight", torch.empty(0, dtype=self.dtype, device=device), persistent=False)

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, data_type={s.data_type}, "
                f"bits={s.bits}, group_size={s.group_size}, act_bits={s.act_bits}, bias={self.bias is not None}")

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight [out, in] in fp32 (then `dtype`): bit for bit the fake-quantized weight."""
        s, layout = self.scheme, self.layout
        if s.data_type == "mx_fp":
            fmt = get_mx_format("mx_fp", s.bits)
            if s.bits == 8:
                codes = self.weight.view(torch.uint8)
            elif s.bits == 4:
                codes = unpack_fp4_codes(self.weight_packed, self.in_features)
            else:
                codes = unpack_fp6_codes(self.weight_packed, self.in_features)
            w = layout.from_groups(dequant_mx(layout.to_groups(codes), self.weight_scale, fmt))
        elif s.data_type == "nv_fp":
            codes = layout.to_groups(unpack_fp4_codes(self.weight_packed, self.in_features))
            w = layout.from_groups(dequant_nvfp4(codes, self.weight_scale.float(), self.weight_global_scale))
        else:
            scale = self.weight_scale_inv if isinstance(s.group_size, tuple) else self.weight_scale
            scale = scale.float().reshape(layout.rows, layout.n_groups)
            w = self.weight.float() * layout.expand(scale)
        return w.to(dtype or self.dtype)

    def post_init(self) -> None:
        self._dq = None
        if self.weight_device().type != "meta":
            self._dq = self.dequantize()

    def weight_device(self) -> torch.device:
        return (self.weight if self._stores_weight else self.weight_packed).device

    # ------------------------------------------------------------------ activations

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scheme
        if not s.quantizes_activations:
            return x
        dt, bits = s.resolved_act_data_type, s.act_bits
        if dt == "nv_fp4_with_static_gs":
            layout = act_layout(x, 16)
            grouped = layout.to_groups(x.float().reshape(layout.out_features, layout.in_features))
            out = qdq_nvfp4(grouped, gscale=self.input_global_scale.float()).weight
            return layout.from_groups(out).reshape(x.shape).to(x.dtype)
        if not s.act_dynamic:
            scale = self.input_scale.float()
            y = x.float() / scale
            if dt == "fp":
                q = torch.clamp(y, -448.0, 448.0).to(torch.float8_e4m3fn).float()
            else:
                half = 2 ** (bits - 1)
                q = torch.clamp(torch.round(y), -half, half - 1)
            return (q * scale).to(x.dtype)
        return qdq_act(x, dt, bits, s.resolved_act_group_size, sym=s.resolved_act_sym, scale_dtype=self.scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._dq
        if weight is None or weight.device != x.device:
            weight = self.dequantize()
            if self.weight_device().type != "meta":
                self._dq = weight
        x = self.quantize_input(x)
        bias = self.bias
        out = F.linear(x.to(weight.dtype), weight, bias.to(weight.dtype) if bias is not None else None)
        return out.to(x.dtype)

