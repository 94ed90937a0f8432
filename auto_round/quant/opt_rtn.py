"""Optimized RTN for symmetric integers: a per-group search of the scale, weighted by input importance.

The reference's default for `iters=0` with sym int below 8 bits. Plain full-range sym uses s = m / 2^(b-1)
(m = the signed group extreme). Here the divisor d of s = m / d is searched per group over a grid around
2^(b-1), keeping the d that minimizes the importance-weighted error

    err(d) = sum_j imp_j * (s * clamp(round(w_j / s), -2^(b-1), 2^(b-1) - 1) - w_j)^2,   s = fp16(m / d)

where imp_j = sum over calibration tokens of x_j^2 (the "imatrix" of the layer's input channel j).
Grid: for 2 bits d = 2 - 0.01 k, k in [-90, 90]; otherwise d = n - k * 1.5 n / 200, k in [-100, 100]
(n = 2^(b-1)), i.e. d from 0.25 n to 1.75 n.

The result is returned as a clip factor f = n / d per group, so that the ordinary sym qdq with
alpha = beta = f reproduces s = m / d exactly (same fp16 rounding, same thresholds).
"""

from __future__ import annotations

import torch

from .int_qdq import signed_extreme, sym_scale


def divisor_grid(bits: int) -> torch.Tensor:
    """Candidate divisors d (float32 [n_candidates]); the plain RTN divisor 2^(b-1) is always one of them."""
    half = 2 ** (bits - 1)
    if bits == 2:
        return half - 0.01 * torch.arange(-90, 91, dtype=torch.float32)
    step = half * 0.75 / 200 * 2
    return half - step * torch.arange(-100, 101, dtype=torch.float32)


def fill_importance(imp: torch.Tensor, grouped_weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Make importance usable. imp and grouped_weight [rows, n_groups, G]; imp >= 0. Returns the same shape.

    Groups with more than half zero entries fall back to a weight-derived importance (|w| for <= 3 bits,
    else |w| + sqrt(mean(w^2) over the row)); otherwise zero entries get the mean of the group's nonzero
    importance, so no weight is ignored entirely.
    """
    zeros = imp == 0
    group_mean = imp.sum(-1, keepdim=True) / (~zeros).sum(-1, keepdim=True).clamp(min=1)
    filled = torch.where(zeros, group_mean.expand_as(imp), imp)
    w_abs = grouped_weight.abs()
    if bits <= 3:
        from_weight = w_abs
    else:
        rms = grouped_weight.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
        from_weight = w_abs + rms
    too_sparse = zeros.sum(-1, keepdim=True) > grouped_weight.shape[-1] // 2
    return torch.where(too_sparse.expand_as(imp), from_weight, filled)


# Elements per slice of the search: the slice's weight, importance and one reused work buffer, ~200 candidates
# each. Measured on a 2-core EPYC (a SmolLM2 block's seven layers / one 4096 x 4096 layer, W4A16): 32K elements
# 1.93 / 7.8 s (per-op overhead), 128K 0.69 / 2.6 s, 256K 0.64 / 2.2-2.4 s, 1M 0.65 / 3.1 s, whole layers
# slower still (and their temporaries grow with the layer).
SEARCH_SLICE_ELEMENTS = 1 << 18


@torch.no_grad()
def search_sym_clip_factor(grouped: torch.Tensor, bits: int, importance: torch.Tensor, wmin: torch.Tensor,
                           wmax: torch.Tensor, scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Per-group factor f = 2^(b-1) / d* [rows, n_groups] minimizing the weighted error (module docstring).

    grouped [rows, n_groups, G] fp32 (zero-padded tail: zero weight, any importance); importance same
    shape (see `fill_importance`); wmin / wmax [rows, n_groups] as from `group_range`. Rows are searched in
    slices of about SEARCH_SLICE_ELEMENTS weights; every group's result is independent of the slicing.
    """
    half = 2 ** (bits - 1)
    extreme = signed_extreme(wmin, wmax)  # [rows, n_groups]
    best_d = torch.full_like(extreme, float(half))
    grid = divisor_grid(bits).tolist()
    rows_per_slice = max(1, SEARCH_SLICE_ELEMENTS // max(1, grouped[0].numel()))
    for start in range(0, grouped.shape[0], rows_per_slice):
        rows = slice(start, start + rows_per_slice)
        _search_rows(grouped[rows], importance[rows], extreme[rows], best_d[rows], grid, half, scale_dtype)
    return half / best_d


def _search_rows(grouped: torch.Tensor, importance: torch.Tensor, extreme: torch.Tensor, best_d: torch.Tensor,
                 grid: list[float], half: int, scale_dtype: torch.dtype) -> None:
    """The grid search on a slice of rows; writes the best divisor into best_d (a view) in place.

    err = sum_G importance * (s * clamp(round(w / s), -half, half - 1) - w)^2, evaluated in one reused
    buffer (in-place ops in the same order as the formula, so the values are those of the plain expression).
    """
    best_err = torch.full_like(extreme, float("inf"))
    work = torch.empty_like(grouped)
    err = torch.empty_like(extreme)
    for d in grid:
        s3 = sym_scale(extreme, d, scale_dtype).float().unsqueeze(-1)
        torch.div(grouped, s3, out=work)
        work.round_().clamp_(-half, half - 1).mul_(s3).sub_(grouped).square_().mul_(importance)
        torch.sum(work, dim=-1, out=err)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d.masked_fill_(better, d)
