"""MX and NVFP4 activation qdq as one autograd node with a hand-derived backward. Pure tensor math.

`qdq_mx` / `qdq_nvfp4` build their gradient from a dozen small autograd ops (abs, amax, log2 with a
straight-through floor, exp2, divide, clamp, straight-through rounding, multiply). On a CPU that is
~60 full-size passes and as many allocations for one forward + backward of an activation, more than
the matmul it feeds (down_proj's input [2048, 1536]: ~100 ms against ~85 ms for the matmul). This
module computes the same forward values and the same gradient in ~25 passes, saving x, the output
(which the following matmul keeps anyway), a bool mask and one per-group tensor for the backward.

The gradient (equal to what autograd derives from `qdq_mx` / `qdq_nvfp4`, up to fp32 rounding).
For a group with elements x_j, scale s (a function of the group max m = max_j |x_j|), y_j = x_j / s,
inside_j = |y_j| <= max_norm (the clamp lets the gradient through there) and out_j = R(clamp(y_j)) * s
with a straight-through rounding R:

    d out_j / d x_j (direct)  = inside_j
    d out_j / d s             = (out_j - inside_j * x_j) / s
    d s / d m                 = s / m            MX: s = 2^e, e = floor(log2 m) - emax with an STE floor,
                                                 zero where e was clamped to [-127, 127] or m = 0
                              = 1 / 6            NVFP4: s = e4m3(g * m / 6) / g with an STE cast, zero where
                                                 g * m / 6 was clamped to 448 or s underflowed to 0

so grad x_j = grad_j * inside_j + [sum_i grad_i * (out_i - inside_i * x_i)] * k * dm/dx_j, with
k = 1 / m (MX) or 1 / (6 s) (NVFP4) per group, and dm/dx_j = sign(x_j) / count at the elements equal
to the max (count of them: the max's gradient is shared evenly among ties, as torch's amax does).
An NVFP4 block whose scale underflowed quantizes to 0 and passes no gradient at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .fp_formats import E2M1, round_to_format
from .mx_qdq import E8M0_MAX_EXP, E8M0_MIN_EXP, MxFormat, exact_exponent, round_element
from .nvfp_qdq import FP4_MAX, FP8_MAX, nvfp_block_scale, nvfp_scales


def mx_forward(x: torch.Tensor, need_grad: bool, fmt: MxFormat, rule: str = "floor",
               rceil_divisor: Optional[float] = None):
    """Dynamic MX qdq (no max_scale) of grouped x [rows, n_groups, G] fp32: see `mx_qdq.qdq_mx` for the values.

    Returns (out, outside, k): out x's shape; with need_grad also the bool mask |y| > max_norm and
    k [rows, n_groups] = 1 / m (0 where the gradient through the scale vanishes), else (out, None, None).
    """
    amax = x.abs().amax(dim=-1)
    safe = torch.where(amax == 0, torch.ones_like(amax), amax)
    e_raw = exact_exponent(safe, fmt, rule, rceil_divisor)
    e = e_raw.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    scale = torch.exp2(e).unsqueeze(-1)
    y = x / scale
    out = round_element(y.clamp(-fmt.max_norm, fmt.max_norm), fmt).mul_(scale)
    if not need_grad:
        return out, None, None
    outside = y.abs_() > fmt.max_norm
    live = (amax != 0) & (e_raw >= E8M0_MIN_EXP) & (e_raw <= E8M0_MAX_EXP)
    k = torch.where(live, 1.0 / safe, torch.zeros_like(safe))
    return out, outside, k


def nvfp4_forward(x: torch.Tensor, need_grad: bool, gscale: torch.Tensor):
    """NVFP4 qdq (no max_scale) of grouped x [rows, n_groups, 16] fp32 with global scale `gscale` [1]: see
    `nvfp_qdq.qdq_nvfp4` for the values. Returns (out, outside, k) as `mx_forward`, k = 1 / (6 s)."""
    g = gscale.float().reshape(-1)
    amax = x.abs().amax(dim=-1)
    s_b = nvfp_block_scale(amax, g)
    s, r = nvfp_scales(s_b, g)
    y = x * r.unsqueeze(-1)
    out = round_to_format(y.clamp(-FP4_MAX, FP4_MAX), E2M1).mul_(s.unsqueeze(-1))
    if not need_grad:
        return out, None, None
    live = s_b != 0
    s_raw = g * (amax * (1.0 / FP4_MAX))  # before the clamp at 448, for the gradient mask below
    outside = (y.abs_() > FP4_MAX).logical_or_(~live.unsqueeze(-1))
    k = torch.where(live & (s_raw <= FP8_MAX), r * (1.0 / FP4_MAX), torch.zeros_like(s))
    return out, outside, k


def group_qdq_backward(x: torch.Tensor, out: torch.Tensor, outside: torch.Tensor, k: torch.Tensor,
                       grad: torch.Tensor) -> torch.Tensor:
    """grad x [rows, n_groups, G] from the forward's x, out, outside (bool, |y| > max_norm or a dead
    block) and k [rows, n_groups] (module docstring)."""
    # masked_fill with the saved bool mask rather than products with it or torch.where: a bool operand
    # of a float product is first converted to a full float copy, and where is slow on CPU
    grad_x = grad.masked_fill(outside, 0.0)  # d out_j / d x_j, direct part
    kept = x.masked_fill(outside, 0.0)  # inside_j * x_j
    through_scale = torch.sub(out, kept, out=kept).mul_(grad).sum(dim=-1).mul_(k)  # [rows, n_groups]
    ax = x.abs()
    not_max = ax != ax.amax(dim=-1, keepdim=True)
    sign_at_max = x.sign().masked_fill_(not_max, 0.0)  # dm / dx_j before the share among ties
    share = through_scale.div_(torch.count_nonzero(sign_at_max, dim=-1).clamp_(min=1))
    return grad_x.addcmul_(sign_at_max, share.unsqueeze(-1))


class _GroupQdq(torch.autograd.Function):
    """out = qdq(x) for grouped x [rows, n_groups, G] float32 with the module docstring's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward: Callable, backward: Callable, *args) -> torch.Tensor:
        out, outside, k = forward(x, True, *args)
        ctx.save_for_backward(x, out, outside, k)
        ctx.backward_fn = backward
        ctx.n_args = len(args)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = ctx.backward_fn(*ctx.saved_tensors, grad.contiguous())
        return (grad_x, None, None) + (None,) * ctx.n_args


def _eager(fn: Callable) -> Callable:
    return fn


@dataclass(frozen=True)
class GroupQdqKernels:
    """How the kernels (`mx_forward`, `nvfp4_forward`, `group_qdq_backward`) run: `wrap(kernel)` returns the
    callable to use. The identity runs them eagerly; `algorithms.compile` passes a torch.compile wrapper."""

    wrap: Callable[[Callable], Callable] = _eager


EAGER = GroupQdqKernels()


def group_qdq(x: torch.Tensor, forward: Callable, args: tuple, kernels: Optional[GroupQdqKernels] = None) -> torch.Tensor:
    """forward(x, need_grad, *args)'s qdq of grouped float32 x, as one autograd node when x needs a gradient."""
    kernels = kernels or EAGER
    if torch.is_grad_enabled() and x.requires_grad:
        return _GroupQdq.apply(x, kernels.wrap(forward), kernels.wrap(group_qdq_backward), *args)
    with torch.no_grad():
        return kernels.wrap(forward)(x, False, *args)[0]
