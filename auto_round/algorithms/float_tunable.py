"""SignRound state for the float weight types: MXFP / MXINT (E8M0 per 32), NVFP4 (E4M3 per 16 and a global
fp32 scale) and FP8 e4m3 (per tensor / channel / group / 128x128 block).

Same interface as `tunable.TunableLayer`. Tuned: the rounding offset V in the element domain (grouped
shape, init 0) and `max_scale`, one multiplier of each group's max ([rows, n_groups], init 1, clamped to
[0, 1], [0, 2] with enable_alg_ext); these types have no min side (reference §3.2-3.4). `init_scale` (from the opt-RTN search) is a
fixed per-group multiplier on top, so iteration 0 of SignRound is exactly the searched result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..layers import layer_weight, set_layer_weight
from ..quant.float_qdq_fused import element_qdq
from ..quant.fp8_qdq import FP8_MAX, fp8_group_scale, fp8_layout, qdq_fp8
from ..quant.fp_formats import E2M1, round_to_format
from ..quant.int_qdq import GroupLayout, group_range
from ..quant.mx_qdq import get_mx_format, mx_block_scale, qdq_mx, round_element
from ..quant.nvfp_qdq import FP4_MAX, global_scale, nvfp4_group_scales, qdq_nvfp4
from ..schemes import QuantScheme
from .tunable import PatchedForward, recomputed_in_backward


@dataclass
class FloatQuantResult:
    """What export needs from one MX / NVFP4 / FP8 layer. Weight = decode(codes) * scale (per group).

    codes: [out, in] uint8 element codes (MXFP / NVFP4: the format's bit pattern, E2M1 = table index with the
        sign in bit 3; MXINT: int8 k with element k * 2^-(bits-2)), or the float8_e4m3fn values for FP8.
        None once the layer is packed and released.
    scale: MX uint8 E8M0 codes (e + 127) [out, n_groups]; NVFP4 fp32 values exact in e4m3 [out, n_groups];
        FP8 fp32 dequant multipliers [rows, n_groups] of the layout (1x1 per tensor, [out, 1] per channel,
        [ceil(out/bm), ceil(in/bn)] per block).
    global_scale: NVFP4 only, fp32 [1] (W = codes * scale / global_scale).
    act_max: static activations only, the calibrated (and tuned) input range max |x|, fp32 [].
    """

    scheme: QuantScheme
    layout: object  # GroupLayout or fp8 BlockLayout
    codes: Optional[torch.Tensor]
    scale: torch.Tensor
    global_scale: Optional[torch.Tensor] = None
    act_max: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)


def float_layout(scheme: QuantScheme, out_features: int, in_features: int):
    if scheme.data_type == "fp":
        return fp8_layout(out_features, in_features, scheme.group_size)
    return GroupLayout(out_features, in_features, scheme.group_size)


class FloatTunableLayer(PatchedForward):
    """V and max_scale of one MX / NVFP4 / FP8 layer plus the qdq that uses them."""

    def __init__(self, module: nn.Module, scheme: QuantScheme, *, enable_minmax_tuning: bool = True,
                 device: "torch.device | str | None" = None, gscale: Optional[torch.Tensor] = None,
                 init_scale: Optional[torch.Tensor] = None, scale_bound: float = 1.0, recompute_qdq: bool = False,
                 fixed_range: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        self.module, self.scheme = module, scheme
        self.recompute_qdq = recompute_qdq  # rebuild the qdq graph in the backward pass (SignRoundConfig)
        self.scale_bound = scale_bound  # max_scale in [0, scale_bound]: 1 (reference), 2 with enable_alg_ext
        weight = layer_weight(module).detach().to(device=device, dtype=torch.float32)
        self.layout = float_layout(scheme, *weight.shape)
        self.grouped = self.layout.to_groups(weight)
        shape = self.grouped.shape[:-1]
        self.v = torch.zeros_like(self.grouped, requires_grad=True)
        self.max_scale = torch.ones(shape, device=weight.device, requires_grad=enable_minmax_tuning)
        self.init_scale = None if init_scale is None else init_scale.to(weight.device)
        self.gscale = None
        if scheme.data_type == "nv_fp":
            self.gscale = (global_scale(weight) if gscale is None else gscale).to(weight.device).float()
        if scheme.data_type == "fp":  # fixed_range: a per-tensor group's range from the whole weight (a row slice)
            self.wmin, self.wmax = group_range(self.grouped) if fixed_range is None else \
                (fixed_range[0].to(weight.device), fixed_range[1].to(weight.device))
        self._own_forward = None

    # ---- parameters (same interface as TunableLayer) -------------------------------------------
    def round_params(self) -> list[torch.Tensor]:
        return [self.v]

    def minmax_params(self) -> list[torch.Tensor]:
        return [self.max_scale] if self.max_scale.requires_grad else []

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.v.detach().clone(), self.max_scale.detach().clone()

    def load(self, params: tuple[torch.Tensor, torch.Tensor]) -> None:
        with torch.no_grad():
            self.v.copy_(params[0])
            self.max_scale.copy_(params[1])

    def clamp_(self) -> None:
        with torch.no_grad():
            self.max_scale.clamp_(0.0, self.scale_bound)

    # ---- qdq ----------------------------------------------------------------------------------
    def qdq(self):
        s = self.scheme
        if s.data_type in ("mx_fp", "mx_int"):
            return qdq_mx(self.grouped, get_mx_format(s.data_type, s.bits), v=self.v, max_scale=self.max_scale,
                          init_scale=self.init_scale)
        if s.data_type == "nv_fp":
            return qdq_nvfp4(self.grouped, gscale=self.gscale, v=self.v, max_scale=self.max_scale,
                             init_scale=self.init_scale)
        return qdq_fp8(self.grouped, v=self.v, max_scale=self._fp8_clip(), wmin=self.wmin, wmax=self.wmax)

    def _fp8_clip(self) -> torch.Tensor:
        """FP8's multiplier of the group max [rows, n_groups]: max_scale, times the searched init_scale if any."""
        return self.max_scale if self.init_scale is None else self.max_scale * self.init_scale

    def qdq_weight(self) -> torch.Tensor:
        """Differentiable fake-quantized weight [out, in] fp32: qdq()'s weight, whose element stage (MX, NVFP4,
        FP8) runs as the single autograd node of quant/float_qdq_fused.py (same values and gradients, 3 bytes per
        weight kept for the backward instead of ~9); with recompute_qdq the whole graph is rebuilt in the
        backward pass (`recomputed_in_backward`) rather than kept."""
        return recomputed_in_backward(self._qdq_weight) if self.recompute_qdq else self._qdq_weight()

    def _qdq_weight(self) -> torch.Tensor:
        s = self.scheme
        if s.data_type in ("mx_fp", "mx_int"):
            fmt = get_mx_format(s.data_type, s.bits)
            _, scale = mx_block_scale(self.grouped, fmt, max_scale=self.max_scale, init_scale=self.init_scale)
            w = element_qdq(self.grouped, self.v, scale, scale, divide=True,
                            round_fn=lambda y: round_element(y, fmt), max_norm=fmt.max_norm)
        elif s.data_type == "nv_fp":
            _, dequant, quant = nvfp4_group_scales(self.grouped, self.gscale.reshape(-1), max_scale=self.max_scale,
                                                   init_scale=self.init_scale)
            w = element_qdq(self.grouped, self.v, quant.unsqueeze(-1), dequant.unsqueeze(-1), divide=False,
                            round_fn=lambda y: round_to_format(y, E2M1), max_norm=FP4_MAX)
        else:  # FP8 e4m3: round through the float8 cast, as qdq_fp8
            scale = fp8_group_scale(self.wmin, self.wmax, self._fp8_clip())
            w = element_qdq(self.grouped, self.v, scale, scale, divide=True,
                            round_fn=lambda y: y.to(torch.float8_e4m3fn).float(), max_norm=FP8_MAX["e4m3"])
        return self.layout.from_groups(w)

    @torch.no_grad()
    def finalize(self, params: Optional[tuple] = None) -> FloatQuantResult:
        """Load `params` (best snapshot), write the fake-quantized weight into the module, return codes."""
        if params is not None:
            self.load(params)
        self.clamp_()
        res = self.qdq()
        set_layer_weight(self.module, self.layout.from_groups(res.weight))
        s = self.scheme
        if s.data_type in ("mx_fp", "mx_int"):
            codes, scale, gscale = res.codes, res.e8m0, None
        elif s.data_type == "nv_fp":
            codes, scale, gscale = res.codes, res.block_scale, res.global_scale
        else:
            codes, scale, gscale = res.q, res.scale, None
        codes = self.layout.from_groups(codes).cpu() if codes.dtype != torch.float8_e4m3fn else \
            self.layout.from_groups(codes.float()).to(torch.float8_e4m3fn).cpu()
        return FloatQuantResult(scheme=s, layout=self.layout, codes=codes, scale=scale.detach().cpu(),
                                global_scale=None if gscale is None else gscale.detach().cpu())
