"""NVFP4 qdq: E2M1 elements, one E4M3 scale per 16 along in_features, one fp32 global scale per tensor.

Pure tensor math: no model, I/O or logging. Inputs are grouped like `int_qdq`: [rows, n_groups, 16].

    global_scale g = 448 * 6 / amax(W)                 (fp32; g = 1 when amax(W) == 0)
    s_b  = e4m3( clamp(g * (max|x_b| * max_scale * init_scale / 6), -448, 448) )   (cast with STE)
    x_q  = e2m1( clamp(x * g / s_b + V, -6, 6) )       (ties to even, STE)
    W^   = x_q * (s_b / g)

The block scale s_b is what is stored (float8_e4m3fn), g is stored as `weight_global_scale`.

fp32 operation order. Which code a value gets is decided by fp32 roundings wherever the exact result is a
tie, and with bf16 weights exact ties are common (g * amax_b / 6 = 448 * amax_b / amax_W is a ratio of two
bf16 numbers; 0.05 % of SmolLM2's codes). The codes follow the reference's kernel, whose accuracy we are
held to: g = 2688 * (1 / amax), s_b from g * (amax_b * c * fl(1/6)) with c = max_scale * init_scale (the
inexact fl(1/6) > 1/6 can send a block-scale tie up: SmolLM2's 448 * 0.365234375 / 2.40625 = 68 becomes 72
where an exact division gives the even 64), and x * r with r = 1 / (s_b * (1 / g)). The dequantized W^ uses s = s_b / g, the loader's formula
(compressed-tensors, `dequant_nvfp4`), so what is tuned is what a loader rebuilds, bit for bit.
A block whose s_b underflows to 0 in e4m3 (max|x_b| < ~1e-3 / g) dequantizes to 0 (r is taken as 0).

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
    inv = 1.0 / torch.where(amax > 0, amax, torch.ones_like(amax))  # multiply by 1/amax: see module docstring
    gs = torch.where(amax > 0, (FP8_MAX * FP4_MAX) * inv, torch.ones_like(amax))
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


_INV_FP4_MAX = 1.0 / FP4_MAX  # multiplied in fp32 as fl32(1/6) > 1/6: the reference's tie-breaking


def nvfp_block_scale(amax: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """s_b = e4m3(clamp(g * (amax * fl(1/6)), -448, 448)) with STE. amax [rows, n_groups] (already tuned)."""
    s = gscale * (amax.float() * _INV_FP4_MAX)
    return e4m3_ste(torch.clamp(s, -FP8_MAX, FP8_MAX))


def nvfp_scales(s_b: torch.Tensor, gscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, r) of block scales s_b [rows, n_groups] and g [1]: s = s_b / g dequantizes (the loader's
    formula), r = 1 / (s_b * (1 / g)) quantizes (x * r, the reference's order); r = 0 where s_b = 0."""
    s = s_b / gscale
    live = s_b != 0
    r = torch.where(live, 1.0 / torch.where(live, s_b * (1.0 / gscale), torch.ones_like(s_b)),
                    torch.zeros_like(s_b))
    return s, r


def nvfp4_group_scales(x: torch.Tensor, g: torch.Tensor, *, max_scale: Optional[torch.Tensor] = None,
                       init_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_b, s, r), each [rows, n_groups], of fp32 grouped x [rows, n_groups, 16] and global scale g [1]: the block
    scale, its dequantizing s and quantizing r of `qdq_nvfp4`, differentiable w.r.t. max_scale / init_scale."""
    amax = x.abs().amax(dim=-1)  # [rows, n_groups]; not detached (see mx_qdq.qdq_mx)
    coeff = _block_max_coefficient(max_scale, init_scale)
    if coeff is not None:
        amax = amax * coeff
    s_b = nvfp_block_scale(amax, g)
    s, r = nvfp_scales(s_b, g)
    return s_b, s, r


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
    s_b, s, r = nvfp4_group_scales(x, g, max_scale=max_scale, init_scale=init_scale)
    # a block whose scale underflowed to 0 has r = 0: its values quantize to clamp(V) and dequantize to 0
    y = x * r.unsqueeze(-1)
    if v is not None:
        y = y + v
    x_q = round_to_format_ste(torch.clamp(y, -FP4_MAX, FP4_MAX), E2M1)
    weight = x_q * s.unsqueeze(-1)
    return NvfpQdqResult(weight=weight, block_scale=s_b.detach(), global_scale=g.detach(), elements=x_q.detach())


def _block_max_coefficient(max_scale: Optional[torch.Tensor],
                           init_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """max_scale * init_scale (either may be None), formed before it multiplies the block max, as the
    reference does (the product order changes the fp32 value of a tie)."""
    if max_scale is None:
        return init_scale
    if init_scale is None:
        return max_scale
    return max_scale * init_scale


def dequant_nvfp4(codes: torch.Tensor, block_scale: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """What a loader computes: e2m1(codes) * (block_scale / global_scale). codes grouped."""
    return decode(codes, E2M1) * (block_scale.float() / gscale.float().reshape(-1)).unsqueeze(-1)
