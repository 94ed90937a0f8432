"""Scale search for the legacy ggml types q4_0, q4_1, q5_0, q5_1, q8_0 (32-element blocks, fp16 scale).

Without an imatrix (quantize_row_<t>_ref, what llama-quantize does):
    q4_0 / q5_0  d = max / -8 (/ -16), max = the signed value of largest magnitude, so q = -8 hits it
    q4_1 / q5_1  d = (max - min) / 15 (/ 31), m = min
    q8_0         d = absmax / 127
With an imatrix (quantize_row_<t>_impl; q8_0 ignores it, as llama.cpp does), element weights
imatrix * sqrt(sigma2 + x^2), sigma2 = mean x^2 over the row:
    q4_0 / q5_0  make_qx_quants(nmax 8 / 16)
    q4_1 / q5_1  make_qkx3_quants(nmax 15 / 31, grid -0.9 + 0.05*is, is = 0..36), m = -the_min
"""

from __future__ import annotations

from typing import Optional

import torch

from .search import make_qkx_quants, make_qx_quants, signed_absmax
from .types import GGMLType, GGUFParams, build_params, round_fp16


def search_legacy(
    w: torch.Tensor, t: GGMLType, imatrix: Optional[torch.Tensor], v: Optional[torch.Tensor]
) -> GGUFParams:
    """Block scales (and mins) of a legacy type for w [out, in]; imatrix [in] or None; v like w or None."""
    out_f, in_f = w.shape
    x = w.reshape(out_f, in_f // t.block, t.block)  # (out, n_blocks, 32)
    vb = None if v is None else v.reshape(x.shape)
    nmax_sym = 1 << (t.bits - 1)  # 8, 16, 128
    if imatrix is None or t.name == "q8_0":
        if t.name == "q8_0":
            d = x.abs().amax(-1) / 127.0
            return build_params(t.name, round_fp16(d))
        if t.sym:
            _, mx = signed_absmax(x)
            return build_params(t.name, round_fp16(mx / float(-nmax_sym)))
        lo, hi = x.amin(-1), x.amax(-1)
        d = (hi - lo) / float((1 << t.bits) - 1)
        return build_params(t.name, round_fp16(d), dmin=round_fp16(lo))

    sigma2 = (w * w).sum(-1, keepdim=True) / in_f  # (out, 1): mean square of the row
    qw = imatrix.reshape(1, -1)
    weights = (qw * torch.sqrt(sigma2 + w * w)).reshape(x.shape)
    if t.sym:
        d = make_qx_quants(x, nmax_sym, weights, vb)
        return build_params(t.name, round_fp16(d))
    scale, the_min = make_qkx_quants(x, weights, (1 << t.bits) - 1, -0.9, 0.05, 36, False, vb)
    return build_params(t.name, round_fp16(scale), dmin=round_fp16(-the_min))
