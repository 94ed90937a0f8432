"""Activation quantize-dequantize: int, FP8, MX and NVFP4, dynamic or static. Pure tensor math.

An activation x [..., hidden] is flattened to [tokens, hidden] and grouped with `GroupLayout`:
    act_group_size -1: per token     [tokens, 1, hidden]
    act_group_size  0: per tensor    [1, 1, tokens*hidden]
    act_group_size  G: per group     [tokens, ceil(hidden/G), G]   (32 for MX, 16 for NVFP4)

Dynamic (act_max=None): each group's range comes from x itself. Static: `act_max`, the calibrated
running max of |x| (a scalar for per-tensor, or anything broadcastable to [rows, n_groups]), gives the
range [-act_max, act_max]. `max_scale` (the tunable act_max_scale) multiplies that range. For NVFP4 the
static value only sets the global scale 448 * 6 / act_max ("nv_fp4_with_static_gs"); the per-16 E4M3
scales stay dynamic and max_scale multiplies their block max. MX activations are dynamic only.
Without a max_scale, MX and NVFP4 run as one autograd node with a hand-derived backward (`act_fused`):
the same values and gradient as the `qdq_mx` / `qdq_nvfp4` composition, in fewer passes.
The static scale a format exports follows from act_max: fp8 `fp8_qdq.fp8_scale(act_max * max_scale)`,
NVFP4 `nvfp_qdq.global_scale_from_amax(act_max)`.

Gradient: rounding is straight-through (identity where not clamped, 0 where clamped), and a dynamic
range keeps its gradient: each group's max |x| also receives d loss / d scale, which follows the group's
quantization error (for q = R(x/s)*s with an STE R, dq/ds = (q - x)/s). The reference's activation qdq
does the same, so SignRound's gradient into the layers before an activation-quantized matmul matches
it. max_scale gets its gradient through the scale.

Per data_type (the reference's names):
    int                         int_qdq sym (full range) or asym, `bits`
    fp (bits 8), fp8_e4m3       fp8_qdq e4m3: scale = amax / 448
    mx_fp, mx_fp_rceil, mx_int  mx_qdq with the floor or the rceil exponent rule
    nv_fp, nv_fp4_with_static_gs  nvfp_qdq (bits 4)
"""

from __future__ import annotations

from typing import Optional

import torch

from .act_fused import GroupQdqKernels, group_qdq, mx_forward, nvfp4_forward
from .fp8_qdq import qdq_fp8
from .int_qdq import GroupLayout, group_range, qdq_int_asym, qdq_int_sym
from .mx_qdq import get_mx_format, qdq_mx
from .nvfp_qdq import NVFP_BLOCK, global_scale, global_scale_from_amax, qdq_nvfp4

# the types whose qdq runs through `act_fused` (whenever there is no max_scale)
FUSED_ACT_DATA_TYPES = ("mx_fp", "mx_fp_rceil", "mx_int", "nv_fp", "nv_fp4_with_static_gs")
ACT_DATA_TYPES = ("int", "fp", "fp8_e4m3", *FUSED_ACT_DATA_TYPES)


def act_layout(x: torch.Tensor, group_size: int) -> GroupLayout:
    """GroupLayout of x viewed as [tokens, hidden] (tokens = all leading dims)."""
    hidden = x.shape[-1]
    return GroupLayout(x.numel() // hidden, hidden, group_size)


def _range(grouped: torch.Tensor, act_max: Optional[torch.Tensor]):
    """(wmin, wmax) [rows, n_groups]: from the data (with its gradient), or [-act_max, act_max] when static."""
    if act_max is None:
        return group_range(grouped)
    wmax = torch.as_tensor(act_max, dtype=torch.float32, device=grouped.device).abs()
    wmax = wmax.expand(grouped.shape[:-1])
    return -wmax, wmax


def qdq_act(
    x: torch.Tensor,
    data_type: str,
    bits: int,
    group_size: int,
    *,
    sym: bool = True,
    act_max: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
    scale_dtype: torch.dtype = torch.float16,
    kernels: Optional[GroupQdqKernels] = None,
) -> torch.Tensor:
    """Quantize-dequantize an activation x [..., hidden]; returns x's shape and dtype (module docstring).

    bits: element bits (8 / 4 for int, 8 for fp, 4 / 6 / 8 for mx_fp, 4 / 8 for mx_int, 4 for nv_fp);
    scale_dtype: rounding of int scales only (fp8 / MX / NVFP scales are defined by their formats);
    kernels: how MX / NVFP4 qdq runs (`act_fused.GroupQdqKernels`: eager by default, or torch.compile'd).
    """
    if data_type not in ACT_DATA_TYPES:
        raise ValueError(f"unknown activation data_type {data_type!r}; known: {ACT_DATA_TYPES}")
    layout = act_layout(x, group_size)
    grouped = layout.to_groups(x.float().reshape(layout.out_features, layout.in_features))
    if data_type == "int":
        out = _qdq_act_int(grouped, bits, sym, act_max, max_scale, scale_dtype)
    elif data_type in ("fp", "fp8_e4m3"):
        if bits != 8:
            raise ValueError(f"fp activations are fp8 e4m3 only, got bits={bits}")
        wmin, wmax = _range(grouped, act_max)
        out = qdq_fp8(grouped, max_scale=max_scale, wmin=wmin, wmax=wmax).weight
    elif data_type.startswith("mx_"):
        if act_max is not None:
            raise ValueError("MX activations are dynamic only (act_max must be None)")
        base, rule = ("mx_fp", "rceil") if data_type == "mx_fp_rceil" else (data_type, "floor")
        fmt = get_mx_format(base, bits)
        if max_scale is None:  # the usual case: one autograd node (act_fused), same values and gradient
            out = group_qdq(grouped, mx_forward, (fmt, rule), kernels)
        else:
            out = qdq_mx(grouped, fmt, max_scale=max_scale, rule=rule).weight
    else:
        if bits != 4:
            raise ValueError(f"nv_fp activations are 4-bit only, got bits={bits}")
        out = _qdq_act_nvfp4(grouped, act_max, max_scale, kernels)
    return layout.from_groups(out).reshape(x.shape).to(x.dtype)


def _qdq_act_int(grouped, bits, sym, act_max, max_scale, scale_dtype):
    """Integer activations: the weight qdq with the detached (or static) range; max_scale clips both
    sides (alpha = beta = max_scale)."""
    wmin, wmax = _range(grouped, act_max)
    fn = qdq_int_sym if sym else qdq_int_asym
    return fn(grouped, bits, alpha=max_scale, beta=max_scale, wmin=wmin, wmax=wmax, scale_dtype=scale_dtype).weight


def _qdq_act_nvfp4(grouped, act_max, max_scale, kernels):
    """NVFP4 activations: global scale from x (dynamic) or 448 * 6 / act_max (static); per-16 dynamic."""
    if grouped.shape[-1] != NVFP_BLOCK:
        raise ValueError(f"NVFP4 activations need groups of {NVFP_BLOCK}, got grouped shape {tuple(grouped.shape)}")
    if act_max is None:
        gscale = global_scale(grouped)
    else:
        gscale = global_scale_from_amax(torch.as_tensor(act_max, dtype=torch.float32, device=grouped.device))
    if max_scale is None:
        return group_qdq(grouped, nvfp4_forward, (gscale,), kernels)
    return qdq_nvfp4(grouped, gscale=gscale, max_scale=max_scale).weight

