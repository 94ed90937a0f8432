"""Per-layer state for weight quantization: the tunable wrapper used by SignRound, and its result.

A `TunableLayer` owns the rounding offset V (grouped shape, init 0) and the clip scales alpha/beta
([rows, n_groups], init 1, clamped to [0, 1]) of one Linear/Conv1D, and temporarily replaces the module's
forward with `F.linear(x, qdq(W; V, alpha, beta), bias)`. Group min/max of the fp weight are computed
once, since W itself never changes during tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import layer_weight, set_layer_weight
from ..quant.int_qdq import GroupLayout, QdqResult, asym_scale_zp, group_range, qdq_int, sym_scale_of_range
from ..quant.int_qdq_fused import int_qdq_tuning
from ..schemes import QuantScheme


@dataclass
class LayerQuantResult:
    """What export needs from one quantized layer.

    scale / zero_point: float32 [rows, n_groups] (zero points integer-valued; 2^(b-1) for sym);
    codes: uint8 [out, in], the stored integers in [0, 2^b - 1]. Weight = scale * (codes - zero_point).
        None once the layer has been packed for export and its codes released (immediate packing).
    act_max: set for static activation quantization (W8A8 static); dynamic schemes need nothing stored.
    """

    scheme: QuantScheme
    layout: GroupLayout
    scale: torch.Tensor
    zero_point: torch.Tensor
    codes: Optional[torch.Tensor]
    act_max: Optional[torch.Tensor] = None  # static activations: calibrated (and tuned) max |input|, fp32 []


def result_from_qdq(res: QdqResult, scheme: QuantScheme, layout: GroupLayout) -> LayerQuantResult:
    codes = layout.from_groups(res.q).to(torch.uint8).cpu()
    return LayerQuantResult(
        scheme=scheme,
        layout=layout,
        scale=res.scale.detach().float().cpu(),
        zero_point=res.zero_point.detach().float().cpu(),
        codes=codes,
    )


def recomputed_in_backward(qdq_weight: Callable[[], torch.Tensor]) -> torch.Tensor:
    """qdq_weight()'s differentiable fake-quantized weight, its autograd graph rebuilt in the backward pass
    instead of kept from the forward.

    The MX / NVFP4 / FP8 qdq keeps 3 bytes per weight from the forward to the backward (bf16 elements and the
    clamp mask of quant/float_qdq_fused.py; ~9 with the plain autograd graph), for every layer of the block at
    once: ~0.65 GB on an 8B model's block, beside the activations. Under non-reentrant checkpointing the forward
    keeps none of it; the backward re-runs qdq_weight() for one layer at a time (the same ops, so
    the same values and bit-identical gradients) and frees that graph once the layer's parameters have their
    gradients. The price is one more qdq forward per layer and step. Without grad mode it is just a call.
    """
    if not torch.is_grad_enabled():
        return qdq_weight()
    return checkpoint(qdq_weight, use_reentrant=False, preserve_rng_state=False)


class PatchedForward:
    """attach() makes `self.module` compute with `self.qdq_weight()` (recomputed at every call, so gradients
    reach the tuned parameters); detach() restores the module's own forward."""

    module: nn.Module
    _own_forward = None

    def qdq_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def attach(self) -> None:
        module = self.module
        self._own_forward = module.__dict__.get("forward")
        bias = module.bias

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = self.qdq_weight().to(x.dtype)
            return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)

        module.forward = forward

    def detach(self) -> None:
        if self._own_forward is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self._own_forward


class TunableLayer(PatchedForward):
    """SignRound parameters of one layer plus the qdq that uses them."""

    def __init__(
        self,
        module: nn.Module,
        scheme: QuantScheme,
        *,
        scale_dtype: torch.dtype = torch.float16,
        enable_minmax_tuning: bool = True,
        device: torch.device | str | None = None,
        fixed_range: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ):
        self.module = module
        self.scheme = scheme
        self.scale_dtype = scale_dtype
        weight = layer_weight(module).detach().to(device=device, dtype=torch.float32)
        self.layout = GroupLayout(weight.shape[0], weight.shape[1], scheme.group_size)
        self.grouped = self.layout.to_groups(weight)  # [rows, n_groups, group]
        # [rows, n_groups]; fixed_range: a per-tensor group's range from the whole weight, for a slice of its rows
        self.wmin, self.wmax = group_range(self.grouped) if fixed_range is None else \
            (fixed_range[0].to(weight.device), fixed_range[1].to(weight.device))
        self.v = torch.zeros_like(self.grouped, requires_grad=True)
        shape = self.wmin.shape
        self.alpha = torch.ones(shape, device=weight.device, requires_grad=enable_minmax_tuning)
        self.beta = torch.ones(shape, device=weight.device, requires_grad=enable_minmax_tuning)
        self._own_forward = None

    # ---- parameters -------------------------------------------------------------------------
    def round_params(self) -> list[torch.Tensor]:
        return [self.v]

    def minmax_params(self) -> list[torch.Tensor]:
        return [self.alpha, self.beta] if self.alpha.requires_grad else []

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.v.detach().clone(), self.alpha.detach().clone(), self.beta.detach().clone()

    def load(self, params: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        with torch.no_grad():
            for dst, src in zip((self.v, self.alpha, self.beta), params):
                dst.copy_(src)

    def clamp_(self) -> None:
        """alpha, beta stay in [0, 1] (reference bound)."""
        with torch.no_grad():
            self.alpha.clamp_(0.0, 1.0)
            self.beta.clamp_(0.0, 1.0)

    # ---- qdq ----------------------------------------------------------------------------------
    def clip(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors [rows, n_groups] that scale the group's min and max: (alpha, beta)."""
        return self.alpha, self.beta

    def qdq(self) -> QdqResult:
        alpha, beta = self.clip()
        return qdq_int(self.grouped, self.scheme.bits, self.scheme.sym, v=self.v, alpha=alpha, beta=beta,
                       wmin=self.wmin, wmax=self.wmax, scale_dtype=self.scale_dtype)

    def qdq_weight(self) -> torch.Tensor:
        """Differentiable fake-quantized weight [out, in] in fp32: qdq()'s weight, computed by the single
        autograd node of quant/int_qdq_fused.py (same values and gradients; it keeps int8 codes for backward
        instead of the plain graph's fp32 clamp input and codes)."""
        bits, sym, dt = self.scheme.bits, self.scheme.sym, self.grouped.dtype
        alpha, beta = self.clip()
        if sym:
            scale, zp = sym_scale_of_range(self.wmin, self.wmax, alpha, beta, bits, self.scale_dtype, dt), None
        else:
            scale, zp = asym_scale_zp(self.wmin, self.wmax, alpha, beta, bits, self.scale_dtype, dt)
        return self.layout.from_groups(int_qdq_tuning(self.grouped, self.v, scale, bits, sym, zp))

    @torch.no_grad()
    def finalize(self, params: Optional[tuple] = None) -> LayerQuantResult:
        """Load `params` (best snapshot), write the fake-quantized weight into the module, return codes."""
        if params is not None:
            self.load(params)
        self.clamp_()
        res = self.qdq()
        set_layer_weight(self.module, self.layout.from_groups(res.weight))
        return result_from_qdq(res, self.scheme, self.layout)
