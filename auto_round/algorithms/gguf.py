"""GGUF (ggml block types) for one layer: llama.cpp-style RTN, imatrix search, and SignRound on top.

Three ways to quantize a layer to a ggml type, matching the reference's GGUF paths:
- RTN (`disable_opt_rtn`): llama.cpp's quantize_row_<type>_ref, i.e. what llama-quantize does without an
  importance matrix (its own scale search included);
- opt-RTN (iters=0, the default): the same search weighted by the imatrix of the layer's calibration inputs;
- SignRound (iters>0): the sub-block scales/mins and super scales are searched once with the imatrix (exactly
  the opt-RTN parameters), then only the rounding offset V is tuned (no min/max tuning, as the reference's
  GGUF wrapper). Iteration 0 is the opt-RTN model, and the best iteration is kept, so the block loss never
  ends above opt-RTN's for the same block inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..layers import layer_weight, set_layer_weight
from ..quant.gguf import GGUFParams, qdq, search_params
from ..schemes import QuantScheme
from .tunable import TunableLayer


@dataclass
class GGUFLayerResult:
    """What the GGUF writer needs from one quantized layer.

    params: the frozen ggml scales (see quant/gguf); codes: uint8 [out, in] element codes as ggml stores
    them, None once packed (immediate packing). W^ = dequant(codes, params).
    """

    scheme: QuantScheme
    params: GGUFParams
    codes: Optional[torch.Tensor]


def _mean_square(imatrix: Optional[torch.Tensor], tokens: Optional[int]) -> Optional[torch.Tensor]:
    if imatrix is None:
        return None
    return imatrix / max(int(tokens or 1), 1)


@torch.no_grad()
def gguf_quantize_module(module: nn.Module, scheme: QuantScheme, imatrix: Optional[torch.Tensor] = None,
                         *, device: "str | torch.device" = "cpu") -> GGUFLayerResult:
    """Search the layer's ggml parameters (imatrix-weighted when given: [in] sum or mean of x^2), round to
    nearest with them, write the fake-quantized weight into the module. Embeddings work too ([vocab, hidden])."""
    weight = layer_weight(module).detach().to(device=device, dtype=torch.float32)
    imat = imatrix.to(device=device, dtype=torch.float32) if imatrix is not None else None
    params = search_params(weight, scheme.gguf, imatrix=imat)
    dequant, codes = qdq(weight, params)
    set_layer_weight(module, dequant)
    return GGUFLayerResult(scheme, _to_cpu(params), codes.to(torch.uint8).cpu())


def gguf_rtn_block(layers: dict[str, tuple[nn.Module, QuantScheme]], imatrix: Optional[dict] = None, *,
                   device: "str | torch.device" = "cpu") -> dict[str, GGUFLayerResult]:
    """RTN (imatrix None or a layer missing from it) or opt-RTN for every layer of a block."""
    imatrix = imatrix or {}
    return {name: gguf_quantize_module(module, scheme, imatrix.get(name), device=device)
            for name, (module, scheme) in layers.items()}


def _to_cpu(params: GGUFParams) -> GGUFParams:
    fields = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(params).items()}
    return GGUFParams(**fields)


class GGUFTunableLayer(TunableLayer):
    """SignRound state of a layer quantized to a ggml type: V only, scales searched once up front."""

    def __init__(self, module: nn.Module, scheme: QuantScheme, *, imatrix: Optional[torch.Tensor] = None,
                 device: "str | torch.device | None" = None, **_ignored):
        self.module = module
        self.scheme = scheme
        weight = layer_weight(module).detach().to(device=device, dtype=torch.float32)
        self.weight = weight
        imat = imatrix.to(device=weight.device, dtype=torch.float32) if imatrix is not None else None
        self.params = search_params(weight, scheme.gguf, imatrix=imat)
        self.v = torch.zeros_like(weight, requires_grad=True)
        self._own_forward = None

    def round_params(self) -> list[torch.Tensor]:
        return [self.v]

    def minmax_params(self) -> list[torch.Tensor]:
        return []

    def snapshot(self) -> tuple[torch.Tensor]:
        return (self.v.detach().clone(),)

    def load(self, params: tuple) -> None:
        with torch.no_grad():
            self.v.copy_(params[0])

    def clamp_(self) -> None:
        """Nothing to clamp: V's signed steps add up to at most lr * iters / 2 = 0.5 by construction."""

    def qdq_weight(self) -> torch.Tensor:
        return qdq(self.weight, self.params, self.v)[0]

    @torch.no_grad()
    def finalize(self, params: Optional[tuple] = None) -> GGUFLayerResult:
        if params is not None:
            self.load(params)
        dequant, codes = qdq(self.weight, self.params, self.v)
        set_layer_weight(self.module, dequant)
        return GGUFLayerResult(self.scheme, _to_cpu(self.params), codes.to(torch.uint8).cpu())
