"""NVFP4 qdq: E2M1 elements, one E4M3 scale per 16 along in_features, one fp32 global scale per tensor.

Pure tensor math: no model, I/O or logging. Inputs are grouped like `int_qdq`: [rows, n_groups, 16].

    global_scale g = 448 * 6 / amax(W)                 (fp32; g = 1 when amax(W) == 0)
    s_b  = e4m3( clamp(g * (max|x_b| * max_scale * init_scale / 6), -448, 448) )   (cast with STE)
    s    = s_b / g                                     (effective fp32 block scale)
    x_q  = e2m1( clamp(x / s + V, -6, 6) )             (ties to even, STE)
    W^   = x_q * s

The block scale s_b is what is stored (float8_e4m3fn), g is stored as `weight_global_scale`.
Operation order: the effective scale s = s_b / g is formed first, then x / s and x_q * s. This is the
order compressed-tensors (the consumer) uses; the doc's `x * g / s_b` is the same value up to one fp32
rounding. A block whose s_b underflows to 0 in e4m3 (max|x_b| < ~1e-3 / g) dequantizes to 0
(x / s is taken as 0 there, not NaN).

Fused layers (q/k/v, gate/up, MoE w1/w3) share one global scale: the minimum of the members' scales,
i.e. 448 * 6 / max of their amax (`shared_global_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .fp_formats import E2M1, decode, encode, round_to_format_ste

FP4_MAX = 6.0
FP8_MAX = 448.0
NVFP_BLOCK = 16


def e4m3_ste(x: torch.Tensor) -> torch.Tensor:
    """Cast to float8_e4m3fn and back (saturating), identity gradient."""
    return (x.detach().to(torch.float8_e4m3fn).float() - x).detach() + x


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """448 * 6 / max|amax| as fp32 shape [1]; 1.0 when it is 0 (nothing to scale). amax: any shape."""
    amax = amax.detach().float().abs().amax()
    gs = torch.where(amax > 0, (FP8_MAX * FP4_MAX) / amax, torch.ones_like(amax))
    return gs.reshape(1)


def global_scale(weight: torch.Tensor) -> torch.Tensor:
    """448 * 6 / amax(weight) as fp32 shape [1] (see `global_scale_from_amax`)."""
    return global_scale_from_amax(weight.detach().abs().amax())


def shared_global_scale(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """One global scale [1] for fused layers: the minimum of the members' `global_scale`."""
    scales = [global_scale(w) for w in weights]
    if not scales:
        raise ValueError("shared_global_scale needs at least one tensor")
    return torch.stack(scales).amin(dim=0)


@dataclass
class NvfpQdqResult:
    """NVFP4 qdq output. weight/codes grouped; block_scale [rows, n_groups]; global_scale [1]."""

    weight: torch.Tensor  # dequantized W^, differentiable w.r.t. V and max_scale
    block_scale: torch.Tensor  # float32 values exactly representable in e4m3 (detached)
    global_scale: torch.Tensor  # float32 [1]
    elements: torch.Tensor  # float32 E2M1 values x_q (detached), grouped shape

    @property
    def codes(self) -> torch.Tensor:
        """uint8 E2M1 codes (index into {0,.5,1,1.5,2,3,4,6}, sign bit 3). Encoded on demand: the tuning
        forward and activation qdq never read them, and encoding every call cost more than the matmuls."""
        return encode(self.elements, E2M1)


def nvfp_block_scale(amax: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """s_b = e4m3(clamp(g * (amax / 6), -448, 448)) with STE. amax [rows, n_groups] (already tuned)."""
    s = gscale * (amax.float() / FP4_MAX)
    return e4m3_ste(torch.clamp(s, -FP8_MAX, FP8_MAX))


def qdq_nvfp4(
    grouped: torch.Tensor,
    *,
    gscale: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
    init_scale: Optional[torch.Tensor] = None,
) -> NvfpQdqResult:
    """NVFP4 qdq of [rows, n_groups, 16] (module docstring).

    gscale: fp32 [1] global scale (default: `global_scale(grouped)`, pass the shared one for fused
    layers); v: grouped shape; max_scale / init_scale: [rows, n_groups] (or broadcastable) block-max
    multipliers.
    """
    if grouped.shape[-1] != NVFP_BLOCK:
        raise ValueError(f"NVFP4 needs groups of {NVFP_BLOCK}, got grouped shape {tuple(grouped.shape)}")
    x = grouped.float()
    g = (global_scale(x) if gscale is None else gscale.float()).reshape(-1)
    amax = x.abs().amax(dim=-1)  # [rows, n_groups]; not detached (see mx_qdq.qdq_mx)
    if max_scale is not None:
        amax = amax * max_scale
    if init_scale is not None:
        amax = amax * init_scale
    s_b = nvfp_block_scale(amax, g)  # [rows, n_groups]
    s = (s_b / g).unsqueeze(-1)  # effective scale
    # a block whose scale underflowed to 0 quantizes to 0: dividing by +inf there gives 0 without a
    # full-size torch.where (x / inf = +-0, and -0 encodes and dequantizes as 0)
    y = x / torch.where(s != 0, s, torch.full_like(s, float("inf")))
    if v is not None:
        y = y + v
    x_q = round_to_format_ste(torch.clamp(y, -FP4_MAX, FP4_MAX), E2M1)
    return NvfpQdqResult(weight=x_q * s, block_scale=s_b.detach(), global_scale=g.detach(), elements=x_q.detach())


def dequant_nvfp4(codes: torch.Tensor, block_scale: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """What a loader computes: e2m1(codes) * (block_scale / global_scale). codes grouped."""
    return decode(codes, E2M1) * (block_scale.float() / gscale.float().reshape(-1)).unsqueeze(-1)
