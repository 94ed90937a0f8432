"""`enable_alg_ext`: the SignRoundV2 additions to SignRound (reference §6.3), for sym int, MX and NVFP4.

Per block, before tuning (the imatrix comes from the block's fp inputs, see compressor):
    init = the opt-RTN search's per-group multiplier of the group max (init_scales.py)
    sym int:  scale = fp16(init * max_scale * m / 2^(b-1))     (m the signed group extreme; one multiplier,
              no separate min side: the reference's s = init_scale * max_scale)
    MX/NVFP4: block max * init * max_scale, as in opt-RTN's qdq
with max_scale clamped to [0, 2] (plain SignRound: [0, 1]); V is tuned as usual. With V = 0 and
max_scale = 1 the layer is exactly its opt-RTN result, so tuning starts from it.

When the block holds 2/3-bit weights or 4-bit activations (W2A16, MXFP4, NVFP4), the loss drops outliers:
the k = numel // 1000 largest |output error| elements of each micro-batch are left out (padding never counts
as one of them) and the squared error is averaged over the rest.
GGUF k-quants keep their own search (gguf.py); asym int and FP8 are not supported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..schemes import QuantScheme
from .init_scales import float_init_scale, int_clip_factor
from .tunable import TunableLayer

# The reference's SignRoundOptimizedWrapperLinear bound on max_scale (plain SignRound clamps to [0, 1]).
ALG_EXT_SCALE_BOUND = 2.0
OUTLIER_FRACTION = 1e-3  # top 0.1 % of the output errors


def supports_alg_ext(scheme: QuantScheme) -> bool:
    """Weight types with a searched init scale: sym int (no ggml super group), MXFP / MXINT, NVFP4."""
    if not scheme.is_quantized or scheme.gguf is not None:
        return False
    if scheme.data_type == "int":
        return scheme.sym
    return scheme.data_type in ("mx_fp", "mx_int", "nv_fp")


def wants_outlier_loss(schemes: "list[QuantScheme]") -> bool:
    """The outlier-masked loss is used when some alg_ext layer has bits < 4 or act_bits <= 4."""
    return any(s.bits < 4 or s.act_bits <= 4 for s in schemes)


def outlier_count(numel: int) -> int:
    """How many error elements a micro-batch of `numel` output elements drops: numel // 1000."""
    return numel // round(1 / OUTLIER_FRACTION)


def outlier_masked_sq_sum(diff: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of diff^2 over all but the k = numel // 1000 largest |diff| elements (differentiable in diff).

    diff: output error of any shape (already multiplied by the padding mask); valid: a mask broadcastable
    to diff (> 0 = a counted position) or None. Masked positions are never chosen as outliers (their
    squared error is 0 either way). The caller divides by (count - k) for the mean over the rest.
    """
    k = outlier_count(diff.numel())
    sq = diff.pow(2)
    if k == 0:
        return sq.sum()
    err = diff.detach().abs()
    if valid is not None:
        err = torch.where(valid.expand_as(err) > 0, err, torch.full_like(err, -1.0))
    drop = torch.topk(err.reshape(-1), k, sorted=False).indices
    keep = torch.ones(diff.numel(), dtype=sq.dtype, device=sq.device)
    keep[drop] = 0.0
    return (sq.reshape(-1) * keep).sum()


class InitScaleTunableLayer(TunableLayer):
    """Sym int layer tuned from a searched init factor: alpha = beta = init * max_scale, max_scale in [0, 2].

    `beta` is the tuned max_scale; `alpha` is unused (stays 1) so snapshots keep the TunableLayer layout.
    init_scale: [rows, n_groups] factor from `init_scales.int_clip_factor` (ones = the plain RTN scale).
    """

    def __init__(self, module: nn.Module, scheme: QuantScheme, *, init_scale: Optional[torch.Tensor],
                 scale_dtype: torch.dtype = torch.float16, enable_minmax_tuning: bool = True,
                 device: "torch.device | str | None" = None):
        if not (scheme.data_type == "int" and scheme.sym):
            raise ValueError(f"InitScaleTunableLayer is for sym int weights, got {scheme.data_type} sym={scheme.sym}")
        super().__init__(module, scheme, scale_dtype=scale_dtype, enable_minmax_tuning=enable_minmax_tuning,
                         device=device)
        self.alpha.requires_grad_(False)
        self.init_scale = torch.ones_like(self.wmin) if init_scale is None else \
            init_scale.to(device=self.wmin.device, dtype=torch.float32)

    def minmax_params(self) -> list[torch.Tensor]:
        return [self.beta] if self.beta.requires_grad else []

    def clamp_(self) -> None:
        with torch.no_grad():
            self.beta.clamp_(0.0, ALG_EXT_SCALE_BOUND)

    def clip(self) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.init_scale * self.beta
        return factor, factor


def alg_ext_init_scales(layers: dict[str, tuple[nn.Module, QuantScheme]], imatrix: dict[str, torch.Tensor], *,
                        gscales: dict[str, torch.Tensor], scale_dtype: torch.dtype = torch.float16,
                        device: str = "cpu") -> dict[str, torch.Tensor]:
    """name -> per-group init multiplier [rows, n_groups] for the supported layers that saw calibration
    tokens (the rest start from the plain max, multiplier 1). NVFP4 layers search with the block's gscales."""
    out = {}
    for name, (module, scheme) in layers.items():
        if not supports_alg_ext(scheme) or name not in imatrix:
            continue
        if scheme.data_type == "int":
            out[name] = int_clip_factor(module, scheme, imatrix[name], scale_dtype=scale_dtype, device=device)
        else:
            out[name] = float_init_scale(module, scheme, imatrix[name], gscale=gscales.get(name), device=device)
    return out
