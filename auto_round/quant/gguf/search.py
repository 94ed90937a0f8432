"""llama.cpp's scale searches (ggml-quants.c), batched over every leading dimension.

Each function works on the last dimension of x, [..., n] (the n elements of one sub-block, or the n
sub-block scales of one super-block) and returns one result per leading index, so a whole weight is
searched at once. The candidate grids, weights and acceptance tests are llama.cpp's; the loops over
candidates and (for the coordinate-descent refinements) over the n positions remain, each step a
tensor op over all groups.

`v` (optional, shaped like x) is a rounding offset added before every element rounding, so the search
finds scales for the rounding SignRound currently uses; v = None means 0 (llama.cpp's behaviour).
Rounding is ggml's nearest_int: round half to even, which is torch.round.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a group whose |max| is below this is all zero


def f32(value: float) -> float:
    """A constant rounded to float32 as C computes it (e.g. nmax + 0.1f*is)."""
    return float(np.float32(value))


def _div(num, den: torch.Tensor) -> torch.Tensor:
    """num / den as a true float32 division (a python scalar numerator would become den.reciprocal()*num)."""
    if not torch.is_tensor(num):
        num = torch.tensor(num, dtype=den.dtype, device=den.device)
    return num / den


def _safe(den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    return torch.where(ok, den, torch.ones_like(den))


def _round(y: torch.Tensor, v: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.round(y if v is None else y + v)


def signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|max|, the signed value with the largest magnitude, first one on ties) over the last dim."""
    amax, idx = x.abs().max(dim=-1)
    return amax, x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def make_qx_quants(
    x: torch.Tensor,
    nmax: int,
    weights: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    return_codes: bool = False,
):
    """Symmetric scale search, make_qx_quants(rmse_type=1): q = clamp(round(x/scale), -nmax, nmax-1).

    Starts from iscale = -nmax/max (max = signed absmax), tries iscale = -(nmax + 0.1*is)/max for
    is = -9..9, each with the weighted least-squares scale sum(w*x*l)/sum(w*l*l); keeps the candidate
    with the largest sum(w*x*l)^2 / sum(w*l*l) (= smallest weighted error). Weights default to x^2.
    Returns scale [...] (0 for an all-zero group), and with return_codes the signed l [..., n] int32.
    """
    amax, mx = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x if weights is None else weights
    wx = w * x

    def fit(num: float):
        iscale = _div(-f32(num), mx).unsqueeze(-1)
        ll = _round(iscale * x, v).clamp_(-nmax, nmax - 1)
        return (wx * ll).sum(-1), (w * ll * ll).sum(-1), ll

    sumlx, suml2, best_l = fit(nmax)
    scale = torch.where(suml2 > 0, sumlx / _safe(suml2, suml2 > 0), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2, ll = fit(f32(nmax + f32(0.1) * step))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / _safe(suml2, better), scale)
        best = torch.where(better, scale * sumlx, best)
        if return_codes:
            best_l = torch.where(better.unsqueeze(-1), ll, best_l)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    if not return_codes:
        return scale
    return scale, torch.where(zero.unsqueeze(-1), torch.zeros_like(best_l), best_l).to(torch.int32)


def _refine_codes(x: torch.Tensor, w: torch.Tensor, ll: torch.Tensor, lo: int, hi: int, *,
                  v: Optional[torch.Tensor] = None, rest_positive: bool = False):
    """llama.cpp's coordinate descent on integer codes (make_q3_quants / make_qp_quants), in place on ll.

    Up to 5 sweeps: each position in turn moves to its best level given the others, round(x*sl2/slx) in
    [lo, hi] (plus its rounding offset v), when that raises sum(w*x*l)^2 / sum(w*l*l). rest_positive:
    also require the other positions' sum(w*l*l) > 0 before trying (make_qp_quants' test).
    x, w, ll: [..., n]. Returns (ll, sum(w*x*l) [...], sum(w*l*l) [...]).
    """
    wx = w * x
    sumlx = (wx * ll).sum(-1)
    suml2 = (w * ll * ll).sum(-1)
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[-1]):
            wi, xi, wxi, li = w[..., i], x[..., i], wx[..., i], ll[..., i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0) if rest_positive else slx > 0
            new_l = _round(xi * sl2 / _safe(slx, ok), None if v is None else v[..., i]).clamp_(lo, hi)
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            ll[..., i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    return ll, sumlx, suml2


def make_q3_quants(x: torch.Tensor, nmax: int, v: Optional[torch.Tensor] = None) -> torch.Tensor:
    """make_q3_quants(do_rmse=True): q3_k's search without an imatrix. Returns scale [...].

    Weights x^2; l = clamp(round(-nmax/max * x), -nmax, nmax-1), then up to 5 sweeps of coordinate
    descent: each position in turn moves to its best level given the others if that raises
    sum(w*x*l)^2 / sum(w*l*l). The scale is the least-squares sum(w*x*l)/sum(w*l*l).
    """
    amax, mx = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = _div(-float(nmax), mx).unsqueeze(-1)
    ll = _round(iscale * x, v).clamp_(-nmax, nmax - 1)
    ll, sumlx, suml2 = _refine_codes(x, x * x, ll, -nmax, nmax - 1, v=v)
    scale = torch.where(suml2 > 0, sumlx / _safe(suml2, suml2 > 0), torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(scale), scale)


def make_qkx_quants(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    v: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale/min search, make_qkx2_quants / make_qkx3_quants (identical given weights).

    x ~ scale*l + min with l = clamp(round((x - min)/scale), 0, nmax), starting from min = min(min(x), 0).
    Candidates iscale = (rmin + rdelta*is + nmax)/(max - min), is = 0..nstep, min being the best min
    so far (llama.cpp updates it inside the loop); for each, the weighted
    least-squares (scale, min) given l, with min forced <= 0 (then scale = sum(w*l*x)/sum(w*l*l)); keeps
    the candidate with the smallest weighted error (squared, or absolute when use_mad).
    Returns (scale [...], the_min [...]) with the_min = -min >= 0, as llama.cpp returns them.
    """
    lo = x.amin(-1).clamp(max=0.0)
    hi = x.amax(-1)
    flat = hi <= lo
    w = weights
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)

    def error(scale, mn, ll):
        diff = scale.unsqueeze(-1) * ll + mn.unsqueeze(-1) - x
        return (w * (diff.abs() if use_mad else diff * diff)).sum(-1)

    mn = lo
    rng = _safe(hi - mn, ~flat).unsqueeze(-1)
    iscale = _div(float(nmax), rng)
    ll = _round(iscale * (x - mn.unsqueeze(-1)), v).clamp_(0, nmax)
    scale = _div(1.0, iscale).squeeze(-1)
    best = error(scale, mn, ll)
    for step in range(nstep + 1):
        # as in llama.cpp, each candidate is taken relative to the best min found so far
        rng = _safe(hi - mn, ~flat).unsqueeze(-1)
        iscale = _div(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax), rng)
        ll = _round(iscale * (x - mn.unsqueeze(-1)), v).clamp_(0, nmax)
        wl = w * ll
        sum_l = wl.sum(-1)
        sum_l2 = (wl * ll).sum(-1)
        sum_xl = (wl * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = _safe(det, ok)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / _safe(sum_l2, sum_l2 != 0), this_scale)
        err = error(this_scale, this_min, ll)
        better = ok & (err < best)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    mn = torch.where(flat, lo, mn)
    return scale, -mn


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive-value scale search, make_qp_quants: quantizes k-quant sub-block scales/mins with an imatrix.

    x >= 0 [..., n] (the sub-block scales of one super-block), weights = per-sub-block sum of element
    weights. Grid d = max/(nmax + 0.1*is), is = -4..4, by weighted error; then 5 sweeps of coordinate
    descent on the codes and the least-squares d = sum(w*x*L)/sum(w*L*L).
    Returns (d [...], codes L [..., n] int32 in [0, nmax]).
    """
    mx = x.amax(-1).clamp(min=0.0)
    zero = mx < GROUP_MAX_EPS
    mx = _safe(mx, ~zero).unsqueeze(-1)
    w = weights

    def mse(iscale):
        ll = torch.round(iscale * x).clamp_(0, nmax)
        diff = x - _div(1.0, iscale) * ll
        return (w * diff * diff).sum(-1)

    iscale = _div(float(nmax), mx)
    best = mse(iscale)
    for step in range(-4, 5):
        if step == 0:
            continue
        cand = _div(f32(f32(f32(0.1) * step) + nmax), mx)
        err = mse(cand)
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better.unsqueeze(-1), cand, iscale)
    ll = torch.round(iscale * x).clamp_(0, nmax)
    ll, sumlx, suml2 = _refine_codes(x, w, ll, 0, nmax, rest_positive=True)
    d = torch.where(suml2 > 0, sumlx / _safe(suml2, suml2 > 0), torch.zeros_like(sumlx))
    d = torch.where(zero, torch.zeros_like(d), d)
    ll = torch.where(zero.unsqueeze(-1), torch.zeros_like(ll), ll)
    return d, ll.to(torch.int32)
