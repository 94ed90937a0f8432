"""Scale search and double quant for the k-quants q2_k, q3_k, q4_k, q5_k, q6_k (256-element super-blocks).

Step 1, one float scale (and min) per sub-block:
    no imatrix (quantize_row_<t>_ref)
        q2_k  make_qkx2_quants(nmax 3, weights |x|, grid -0.5 + 0.1*is, is = 0..15, absolute error)
        q3_k  make_q3_quants(nmax 4, weights x^2, coordinate descent)
        q4_k  make_qkx2_quants(nmax 15, weights sqrt(mean x^2 of the sub-block) + |x|, grid -1 + 0.1*is, 0..20)
        q5_k  make_qkx2_quants(nmax 31, same weights, grid -0.5 + 0.1*is, 0..15)
        q6_k  make_qx_quants(nmax 32, weights x^2)
    imatrix (quantize_row_<t>_impl): element weights imatrix * sqrt(sigma2 + x^2), sigma2 = c * mean x^2
    of the super-block (c = 1 for q2_k, 2 for q3_k/q4_k/q5_k); asym types use make_qkx3_quants
    (grid -0.9 + 0.05*is, is = 0..36, squared error), q3_k make_qx_quants(nmax 4); q6_k make_qx_quants
    with the raw imatrix as weights.
Step 2, double quant of the sub-block scales into integer codes times one fp16 d per super-block:
    asym (q2_k 4-bit, q4_k/q5_k 6-bit): no imatrix d = max/nmax, codes round(scale/d); with an imatrix
        make_qp_quants weighted by each sub-block's summed element weight. Same for the mins with dmin.
    sym: q3_k d = max/-32 by signed max, codes in [-32, 31] (imatrix: make_qx_quants(nmax 32) weighted);
        q6_k d = max/-128, codes min(127, round(scale/d)) (same with or without imatrix).
"""

from __future__ import annotations

from typing import Optional

import torch

from .search import GROUP_MAX_EPS, make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants, signed_absmax
from .types import QK_K, GGMLType, GGUFParams, build_params, round_fp16

# (rmin, rdelta, nstep, use_mad) of make_qkx2_quants in the no-imatrix search of each asym k-quant
_QKX2_GRID = {"q2_k": (-0.5, 0.1, 15, True), "q4_k": (-1.0, 0.1, 20, False), "q5_k": (-0.5, 0.1, 15, False)}
_QKX3_GRID = (-0.9, 0.05, 36, False)  # make_qkx3_quants with an imatrix (all asym k-quants)


def _double_quant_asym(values: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """No-imatrix double quant of non-negative sub-block values [..., n]: (fp16 d [...], codes [..., n])."""
    mx = values.amax(-1).clamp(min=0.0)
    pos = mx > 0
    inv = torch.where(pos, float(nmax) / torch.where(pos, mx, torch.ones_like(mx)), torch.zeros_like(mx))
    codes = torch.round(inv.unsqueeze(-1) * values).clamp_(0, nmax)
    d = round_fp16(torch.where(pos, mx / float(nmax), torch.zeros_like(mx)))
    return d, codes.to(torch.int32)


def _double_quant_sym(values: torch.Tensor, nmax: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sym double quant [..., n]: d = signed max / -nmax (fp16), codes clamp(round(scale/d), -nmax, nmax-1).

    A super-block whose largest |scale| is 0 or below eps gets d = 0 and codes 0.
    """
    amax, mx = signed_absmax(values)
    live = (amax > 0) & (amax >= eps)
    iscale = torch.where(live, float(-nmax) / torch.where(live, mx, torch.ones_like(mx)), torch.zeros_like(mx))
    codes = torch.round(iscale.unsqueeze(-1) * values).clamp_(-nmax, nmax - 1)
    codes = torch.where(live.unsqueeze(-1), codes, torch.zeros_like(codes))
    d = round_fp16(torch.where(live, 1.0 / torch.where(live, iscale, torch.ones_like(iscale)), torch.zeros_like(mx)))
    return d, codes.to(torch.int32)


def _imatrix_weights(x: torch.Tensor, qw: torch.Tensor, sigma_factor: float) -> torch.Tensor:
    """imatrix * sqrt(sigma2 + x^2), sigma2 = sigma_factor * mean x^2 over each super-block."""
    sumx2 = (x * x).sum(dim=(-2, -1), keepdim=True)
    sigma2 = sigma_factor * sumx2 / QK_K
    return qw * torch.sqrt(sigma2 + x * x)


def search_kquant(
    w: torch.Tensor, t: GGMLType, imatrix: Optional[torch.Tensor], v: Optional[torch.Tensor]
) -> GGUFParams:
    """Super-block d/dmin and sub-block codes of a k-quant for w [out, in]; imatrix [in]; v like w."""
    out_f, in_f = w.shape
    nb, ns = in_f // QK_K, QK_K // t.sub
    x = w.reshape(out_f, nb, ns, t.sub)  # (out, super-blocks, sub-blocks, sub)
    vb = None if v is None else v.reshape(x.shape)
    qw = None if imatrix is None else imatrix.reshape(1, nb, ns, t.sub)
    flat = (out_f, nb * ns)
    nq = (1 << t.bits) - 1

    if t.sym:
        if t.name == "q3_k":
            if qw is None:
                scales = make_q3_quants(x, 4, vb)  # (out, nb, ns)
                d, sc = _double_quant_sym(scales, 32, 0.0)
            else:
                weights = _imatrix_weights(x, qw, 2.0)
                scales = make_qx_quants(x, 4, weights, vb)
                d, sc = make_qx_quants(scales, 32, weights.sum(-1), return_codes=True)
                d = round_fp16(d)
                sc = torch.where((d == 0).unsqueeze(-1), torch.zeros_like(sc), sc)
        else:  # q6_k: llama.cpp weights the imatrix search with the raw imatrix
            scales = make_qx_quants(x, 32, None if qw is None else qw.expand(x.shape), vb)
            d, sc = _double_quant_sym(scales, 128, GROUP_MAX_EPS)
        return build_params(t.name, d, sc=sc.reshape(flat))

    if qw is None:
        sq = torch.sqrt((x * x).sum(-1, keepdim=True) / t.sub)
        weights = x.abs() if t.name == "q2_k" else sq + x.abs()
        rmin, rdelta, nstep, mad = _QKX2_GRID[t.name]
        scales, mins = make_qkx_quants(x, weights, nq, rmin, rdelta, nstep, mad, vb)
        d, sc = _double_quant_asym(scales, (1 << t.super_bits) - 1)
        dmin, m = _double_quant_asym(mins, (1 << t.super_bits) - 1)
    else:
        weights = _imatrix_weights(x, qw, 1.0 if t.name == "q2_k" else 2.0)
        scales, mins = make_qkx_quants(x, weights, nq, *_QKX3_GRID, vb)
        sw = weights.sum(-1)  # (out, nb, ns): weight of each sub-block
        d, sc = make_qp_quants(scales, (1 << t.super_bits) - 1, sw)
        dmin, m = make_qp_quants(mins, (1 << t.super_bits) - 1, sw)
        d, dmin = round_fp16(d), round_fp16(dmin)
    return build_params(t.name, d, dmin=dmin, sc=sc.reshape(flat), m=m.reshape(flat))
