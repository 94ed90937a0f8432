"""Optimized RTN for MX and NVFP4: a per-group search of the scale multiplier, weighted by importance.

Pure tensor math: no model, I/O or logging. grouped is [rows, n_groups, G]; importance (the imatrix,
sum over calibration tokens of x_j^2 per input channel j) has the grouped shape or broadcasts to it
(`importance_to_groups` turns a [in] vector into it; `opt_rtn.fill_importance` fixes zero entries).

For each candidate multiplier c (applied to the block max before the scale is formed) and group b:

    err_b(c) = sum_j importance_j * (W^_j(c) - w_j)^2

and the c with the lowest err_b is kept per group. The plain RTN multiplier 1.0 is tried first and a
candidate replaces it only when strictly better, so the result is never worse than RTN on the
weighted error. The returned multipliers are meant for the qdq's `init_scale` argument, which then
reproduces the searched weight exactly.

    MX    (mx_fp / mx_int): c in {1, 0.5, 2}: the shared exponent one lower, unchanged, one higher.
    NVFP4: c in {0.50, 0.51, ..., 1.51} (102 values) on the per-16 block max before the E4M3 cast;
           the global scale stays fixed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .mx_qdq import MxFormat, qdq_mx
from .fp_formats import E2M1, round_to_format
from .nvfp_qdq import FP4_MAX, global_scale, nvfp_block_scale, nvfp_scales

MX_CANDIDATES = (1.0, 0.5, 2.0)
NVFP4_CANDIDATES = tuple((50 + k) / 100 for k in range(102))  # 0.50 .. 1.51; 1.0 is exact (100 / 100)


def importance_to_groups(imatrix: torch.Tensor, layout) -> torch.Tensor:
    """[in] importance vector -> the layout's [rows, n_groups, G] (same vector for every row)."""
    return layout.to_groups(imatrix.float().expand(layout.out_features, layout.in_features))


def weighted_sse(w_hat: torch.Tensor, grouped: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """sum_j importance_j * (w_hat_j - w_j)^2 per group: [rows, n_groups] from grouped tensors."""
    return (importance * (w_hat - grouped).pow(2)).sum(dim=-1)


def _search(qdq_fn, grouped: torch.Tensor, importance: torch.Tensor, candidates: Sequence[float]) -> torch.Tensor:
    """Per-group best multiplier among candidates (candidates[0] is the baseline, kept on ties)."""
    best_c = torch.full(grouped.shape[:-1], float(candidates[0]), device=grouped.device)
    best_err = weighted_sse(qdq_fn(best_c), grouped, importance)
    for c in candidates[1:]:
        cand = torch.full_like(best_c, float(c))
        err = weighted_sse(qdq_fn(cand), grouped, importance)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_c = torch.where(better, cand, best_c)
    return best_c


@torch.no_grad()
def search_mx_scale(grouped: torch.Tensor, fmt: MxFormat, importance: torch.Tensor, rule: str = "floor",
                    candidates: Sequence[float] = MX_CANDIDATES) -> torch.Tensor:
    """Per-block multiplier [rows, n_groups] from {1, 0.5, 2} minimizing the weighted error of qdq_mx."""
    x = grouped.float()
    return _search(lambda c: qdq_mx(x, fmt, init_scale=c, rule=rule).weight, x, importance, candidates)


@torch.no_grad()
def search_nvfp4_scale(grouped: torch.Tensor, importance: torch.Tensor, gscale: Optional[torch.Tensor] = None,
                       candidates: Sequence[float] = NVFP4_CANDIDATES) -> torch.Tensor:
    """Per-16 coefficient [rows, n_groups] from 0.50..1.51 minimizing the weighted error of qdq_nvfp4.

    gscale: the (possibly fused-shared) global scale; default `global_scale(grouped)`.
    """
    x = grouped.float()
    g = (global_scale(x) if gscale is None else gscale.float()).reshape(-1)
    shape = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1])  # [groups, 16]
    imp = importance.float().expand_as(x).reshape(-1, x.shape[-1])
    amax = xf.abs().amax(dim=-1)
    best_c = torch.full_like(amax, float(candidates[0]))
    best_err = torch.full_like(amax, float("inf"))
    last_sb = torch.full_like(amax, float("nan"))
    for c in candidates:
        s_b = nvfp_block_scale(amax * c, g)
        # the E4M3 cast maps ~8 neighbouring coefficients to one block scale; a group whose scale did not
        # change has the error it had, so only changed groups are evaluated (same result as all of them)
        idx = (s_b != last_sb).nonzero().squeeze(-1)
        last_sb = s_b
        if idx.numel() == 0:
            continue
        s, r = nvfp_scales(s_b[idx], g)  # the same arithmetic as qdq_nvfp4
        xs = xf[idx]
        y = xs * r.unsqueeze(-1)
        w_hat = round_to_format(torch.clamp(y, -FP4_MAX, FP4_MAX), E2M1) * s.unsqueeze(-1)
        err = (imp[idx] * (w_hat - xs).pow(2)).sum(-1)
        better = err < best_err[idx]
        best_err[idx] = torch.where(better, err, best_err[idx])
        best_c[idx] = torch.where(better, torch.full_like(err, float(c)), best_c[idx])
    return best_c.reshape(shape)
