"""Integer qdq of the SignRound inner loop as one autograd node that keeps int8 codes, not fp32 tensors.

The plain graph of `qdq_int_sym` / `qdq_int_asym` (x = W/s + V, a straight-through round, a clamp, s * q)
keeps two or three weight-sized fp32 tensors per layer alive from the forward to the backward pass (the
clamp's input, the codes), and walks the weight with seven element-wise kernels each way. Here the forward
runs in place on one buffer and keeps only the integer codes, clamped one step past the bounds, in int8
(int16 at 8 bits): 1 byte per weight instead of 8, and enough to rebuild both q and the clamp's mask. The
values and gradients are the plain graph's, operation for operation (tests/test_int_qdq_fused.py checks bit
equality):

    sym:   q = clamp(round(W/s + V), -2^(b-1), 2^(b-1) - 1)           W^ = s * q
    asym:  q = clamp(round(W/s + V) + zp, 0, 2^b - 1)                  W^ = s * (q - zp)

    dV  = m * dW^ * s                                                  m: the clamp passes (bounds included)
    ds  = sum_g(dW^ * (q [- zp])) + sum_g(-dV * ((W / s) / s))           (torch's div backward, in its order)
    dzp = sum_g(-dW^ * s) + sum_g(dV)                                  (asym)

round's straight-through estimator makes round(x) act as x in the backward pass, hence no round term.
Shapes: W, V [rows, n_groups, group]; s, zp [rows, n_groups, 1] (broadcast along the group). Pure tensor
math: no model, I/O or logging.
"""

from __future__ import annotations

from typing import Optional

import torch


def _code_dtype(lo: float, hi: float) -> torch.dtype:
    """The narrowest integer type that holds the codes and one step beyond either bound (the clamp's mask)."""
    return torch.int8 if lo - 1 >= -128 and hi + 1 <= 127 else torch.int16


class _IntQdq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grouped, v, s3, zp3, lo: float, hi: float):  # type: ignore[override]
        with torch.no_grad():
            x = torch.div(grouped, s3)
            x.add_(v).round_()  # (round(x) - x) + x == round(x) exactly: round_ste's forward value
            if zp3 is not None:
                x.add_(zp3)
            # the codes one step past the bounds, 1-2 bytes each: enough for the clamp's mask and for q
            codes = x.clamp(lo - 1, hi + 1).to(_code_dtype(lo, hi))
            x.clamp_(lo, hi)
            if zp3 is not None:
                x.sub_(zp3)
            out = x.mul_(s3)
        ctx.save_for_backward(grouped, s3, zp3, codes)
        ctx.lo, ctx.hi = lo, hi
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grouped, s3, zp3, codes = ctx.saved_tensors
        mask = (codes >= ctx.lo).logical_and_(codes <= ctx.hi)  # torch.clamp's backward passes at the bounds
        grad_s = None
        if ctx.needs_input_grad[2]:
            q = codes.clamp(ctx.lo, ctx.hi).to(grad.dtype)
            if zp3 is not None:
                q.sub_(zp3)  # the factor s multiplies: q - zp
            grad_s = (grad * q).sum(-1, keepdim=True)
            del q
        grad_q = grad * s3
        grad_zp = (-grad_q).sum(-1, keepdim=True) if zp3 is not None and ctx.needs_input_grad[3] else None
        grad_x = grad_q.masked_fill_(mask.logical_not_(), 0.0)  # +0 where the clamp cut, as torch.clamp's backward
        if grad_s is not None:
            grad_s = grad_s + (-grad_x * ((grouped / s3) / s3)).sum(-1, keepdim=True)
        if grad_zp is not None:
            grad_zp = grad_zp + grad_x.sum(-1, keepdim=True)
        grad_v = grad_x if ctx.needs_input_grad[1] else None
        return None, grad_v, grad_s, grad_zp, None, None


def int_qdq_tuning(grouped: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, bits: int, sym: bool,
                   zero_point: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fake-quantized weight [rows, n_groups, group] of the tuning step, differentiable w.r.t. V, the scale
    and (asym) the zero point. scale / zero_point: [rows, n_groups] from `sym_scale_of_range` /
    `asym_scale_zp`; same values and gradients as qdq_int_sym / qdq_int_asym's `weight` (module docstring)."""
    s3 = scale.unsqueeze(-1)
    if sym:
        half = 2 ** (bits - 1)
        return _IntQdq.apply(grouped, v, s3, None, float(-half), float(half - 1))
    if zero_point is None:
        raise ValueError("asym qdq needs the zero point")
    return _IntQdq.apply(grouped, v, s3, zero_point.unsqueeze(-1), 0.0, float(2**bits - 1))
