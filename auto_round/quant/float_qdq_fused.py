"""The element stage of the MX / NVFP4 / FP8 weight qdq of a SignRound step as one autograd node. Pure tensor math.

For grouped weights x [rows, n_groups, G] (no gradient), the rounding offset V (same shape) and per-group
multipliers q, d [rows, n_groups, 1]:

    y   = x / q  (MX, FP8: q = d = scale)      or      x * q  (NVFP4: q = r, the quantizing multiplier; d = s)
    out = E(clamp(y + V, -m, m)) * d           E: round to the element grid (ties to even), straight-through

The plain composition keeps the division's input, the clamp's input, the rounded elements and the STE terms
(~9 bytes per weight beyond the weight itself) from the forward to the backward. This node keeps the element
values in bfloat16 (exact for every MX / NVFP4 / FP8 element type) and the clamp mask (bool): 3 bytes per
weight; x is the caller's persistent weight, saved by reference. Its backward evaluates the gradients of the
plain graph expression by expression, so V, q and d receive bit-identical gradients
(tests/test_float_qdq_fused.py), and the per-group chain from q / d to max_scale stays in autograd:

    dL/dV = where(inside, g * d, 0)                          inside: -m <= y + V <= m (clamp's inclusive mask)
    dL/dd = sum_G(g * E)
    dL/dq = sum_G(-dL/dV * ((x / q) / q))  (division)     or  sum_G(dL/dV * x)  (multiplication)

With q and d the same tensor (MX, FP8) autograd adds the two group sums, as it does for the plain graph.
"""

from __future__ import annotations

from typing import Callable

import torch


class _ElementQdq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, v: torch.Tensor, q: torch.Tensor, d: torch.Tensor, divide: bool,
                round_fn: Callable[[torch.Tensor], torch.Tensor], max_norm: float):
        y = (x / q) if divide else (x * q)
        y.add_(v)
        clamped = y.clamp(-max_norm, max_norm)
        outside = torch.ne(clamped, y)  # the clamp's gradient mask, inverted (clamp passes its bounds)
        del y
        elem = round_fn(clamped)
        out = elem * d
        # every element value of the MX / NVFP4 / FP8 formats is exact in bfloat16 (at most 4 significant bits,
        # MXINT8's k / 64 with |k| <= 127 seven; exponents far inside bf16's range), and the casts are cheap
        # (float8's are not)
        ctx.save_for_backward(x, elem.to(torch.bfloat16), outside, q, d)
        ctx.divide = divide
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, elem, outside, q, d = ctx.saved_tensors
        need_v, need_q, need_d = ctx.needs_input_grad[1:4]
        grad_y = (grad * d).masked_fill_(outside, 0.0)  # where(inside, grad * d, 0), as clamp's backward
        grad_d = (grad * elem.float()).sum(dim=-1, keepdim=True) if need_d else None
        grad_q = None
        if need_q:
            if ctx.divide:  # sum(-grad_y * ((x / q) / q)), with the sign taken out of the sum (exact either way)
                grad_q = ((x / q).div_(q).mul_(grad_y)).sum(dim=-1, keepdim=True).neg_()
            else:
                grad_q = (grad_y * x).sum(dim=-1, keepdim=True)
        return None, grad_y if need_v else None, grad_q, grad_d, None, None, None


def element_qdq(x: torch.Tensor, v: torch.Tensor, q: torch.Tensor, d: torch.Tensor, *, divide: bool,
                round_fn: Callable[[torch.Tensor], torch.Tensor], max_norm: float) -> torch.Tensor:
    """E(clamp(x / q + v)) * d (divide=True) or E(clamp(x * q + v)) * d, fp32 [rows, n_groups, G], with the
    plain graph's gradients to v, q and d (module docstring). round_fn rounds values already within
    +-max_norm to the element grid."""
    return _ElementQdq.apply(x, v, q, d, divide, round_fn, max_norm)
