"""Integer quantize-dequantize (qdq) on grouped weights. Pure tensor math: no model, I/O or logging.

Shapes. A Linear weight W is [out, in]. It is viewed as groups along `in`:
    grouped = [rows, n_groups, G]
with, for group_size
    G > 0 : rows = out, n_groups = ceil(in / G), the ragged last group zero-padded;
    G = -1: rows = out, n_groups = 1, G = in (per output channel);
    G = 0 : rows = 1,   n_groups = 1, G = out * in (one scale for the tensor).
Scales and zero points are [rows, n_groups]; the tuned rounding offset V has the grouped shape.

Zero padding never changes a group's range: the range is always widened to contain 0 (min <= 0 <= max).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """torch.round (half to even) in the forward pass, identity gradient in the backward pass."""
    return (torch.round(x) - x).detach() + x


def scale_threshold(scale_dtype: torch.dtype) -> float:
    """Smallest |scale| allowed: 1e-5, or 1e-8 when scales are kept in fp32 (reference values)."""
    return 1e-8 if scale_dtype == torch.float32 else 1e-5


@dataclass(frozen=True)
class GroupLayout:
    """How a [out, in] weight maps to [rows, n_groups, group] (see module docstring)."""

    out_features: int
    in_features: int
    group_size: int

    @property
    def rows(self) -> int:
        return 1 if self.group_size == 0 else self.out_features

    @property
    def group(self) -> int:
        if self.group_size == 0:
            return self.out_features * self.in_features
        if self.group_size == -1 or self.group_size >= self.in_features:
            return self.in_features
        return self.group_size

    @property
    def n_groups(self) -> int:
        if self.group_size <= 0:
            return 1
        return -(-self.in_features // self.group)

    @property
    def padded_in(self) -> int:
        return self.n_groups * self.group if self.group_size > 0 else self.in_features

    @property
    def grouped_shape(self) -> tuple[int, int, int]:
        return (self.rows, self.n_groups, self.group)

    def to_groups(self, w: torch.Tensor) -> torch.Tensor:
        """[out, in] -> [rows, n_groups, group], zero-padding the last group."""
        pad = self.padded_in - self.in_features
        if pad:
            w = torch.nn.functional.pad(w, (0, pad))
        return w.reshape(self.grouped_shape)

    def from_groups(self, g: torch.Tensor) -> torch.Tensor:
        """[rows, n_groups, group] -> [out, in], dropping the padding."""
        w = g.reshape(self.out_features, self.padded_in)
        return w[:, : self.in_features] if self.padded_in != self.in_features else w

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """[rows, n_groups] -> [out, in]: each element gets its group's value."""
        full = per_group.unsqueeze(-1).expand(self.grouped_shape)
        return self.from_groups(full)


def group_range(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of [rows, n_groups, group], widened to include 0. Shapes [rows, n_groups]."""
    wmin = grouped.amin(dim=-1).clamp(max=0)
    wmax = grouped.amax(dim=-1).clamp(min=0)
    return wmin, wmax


def signed_extreme(wmin: torch.Tensor, wmax: torch.Tensor) -> torch.Tensor:
    """Per group, the extreme of larger magnitude with the sign that maps it to -2^(b-1): -max+ when the
    positive side dominates (or ties), +|min-| otherwise. [rows, n_groups]."""
    neg_abs, pos_abs = -wmin, wmax
    sign = torch.where(pos_abs < neg_abs, 1.0, -1.0)
    return sign * torch.maximum(pos_abs, neg_abs)


def sym_scale(extreme: torch.Tensor, divisor: float, scale_dtype: torch.dtype) -> torch.Tensor:
    """Full-range sym scale extreme / divisor, rounded to scale_dtype, |s| >= threshold with the sign kept
    (s == 0 becomes +threshold). Returned in scale_dtype."""
    thresh = scale_threshold(scale_dtype)
    scale = (extreme / divisor).to(scale_dtype)
    return torch.where(scale < 0, scale.clamp(max=-thresh), scale.clamp(min=thresh))


@dataclass
class QdqResult:
    """Output of a qdq call. `weight` is in the grouped shape, the rest [rows, n_groups] (zp for sym: scalar)."""

    weight: torch.Tensor  # dequantized, differentiable w.r.t. V / alpha / beta
    scale: torch.Tensor  # float32 holding values exactly representable in scale_dtype
    zero_point: torch.Tensor  # integer-valued float
    q: torch.Tensor  # stored integer codes in [0, 2^b - 1], grouped shape (detached)


def _apply_clip(wmin, wmax, alpha, beta):
    if alpha is not None:
        wmin = wmin * alpha
    if beta is not None:
        wmax = wmax * beta
    return wmin, wmax


def asym_scale_zp(wmin: torch.Tensor, wmax: torch.Tensor, alpha: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                  bits: int, scale_dtype: torch.dtype, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Asym scale and integer zero point [rows, n_groups] of the clipped range (formula: qdq_int_asym),
    differentiable w.r.t. alpha / beta (the zero point through a straight-through round)."""
    maxq = 2**bits - 1
    wmin, wmax = _apply_clip(wmin, wmax, alpha, beta)
    thresh = scale_threshold(scale_dtype)
    scale = ((wmax - wmin) / maxq).to(scale_dtype).clamp(min=thresh).to(dtype)
    zp = torch.clamp(round_ste(-wmin / scale), 0, maxq)
    return scale, zp


def sym_scale_of_range(wmin: torch.Tensor, wmax: torch.Tensor, alpha: Optional[torch.Tensor],
                       beta: Optional[torch.Tensor], bits: int, scale_dtype: torch.dtype,
                       dtype: torch.dtype) -> torch.Tensor:
    """Signed full-range sym scale [rows, n_groups] of the clipped range (formula: qdq_int_sym)."""
    wmin, wmax = _apply_clip(wmin, wmax, alpha, beta)
    return sym_scale(signed_extreme(wmin, wmax).to(dtype), 2 ** (bits - 1), scale_dtype).to(dtype)


def qdq_int_asym(
    grouped: torch.Tensor,
    bits: int,
    *,
    v: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    wmin: Optional[torch.Tensor] = None,
    wmax: Optional[torch.Tensor] = None,
    scale_dtype: torch.dtype = torch.float16,
) -> QdqResult:
    """Asymmetric integer qdq with an integer zero point.

        s  = max(((beta*max+ - alpha*min-) / (2^b - 1)) in scale_dtype, thresh)
        zp = round(-alpha*min- / s)           clamped to [0, 2^b - 1]
        q  = clamp(round(W/s + V) + zp, 0, 2^b - 1)
        W^ = s * (q - zp)
    grouped: [rows, n_groups, group]; v same shape; alpha/beta/wmin/wmax [rows, n_groups].
    """
    maxq = 2**bits - 1
    if wmin is None or wmax is None:
        wmin, wmax = group_range(grouped)
    scale, zp = asym_scale_zp(wmin, wmax, alpha, beta, bits, scale_dtype, grouped.dtype)
    s3, zp3 = scale.unsqueeze(-1), zp.unsqueeze(-1)
    x = grouped / s3
    if v is not None:
        x = x + v
    q = torch.clamp(round_ste(x) + zp3, 0, maxq)
    return QdqResult(weight=s3 * (q - zp3), scale=scale, zero_point=zp, q=q.detach())


def qdq_int_sym(
    grouped: torch.Tensor,
    bits: int,
    *,
    v: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    wmin: Optional[torch.Tensor] = None,
    wmax: Optional[torch.Tensor] = None,
    scale_dtype: torch.dtype = torch.float16,
) -> QdqResult:
    """Full-range symmetric integer qdq (the reference's default for W*A16).

        m   = max(beta*max+, -alpha*min-)
        s   = -m / 2^(b-1) if the positive extreme dominates (or ties), else +m / 2^(b-1)
        |s| >= thresh, sign kept (s == 0 becomes +thresh)
        q   = clamp(round(W/s + V), -2^(b-1), 2^(b-1) - 1)
        W^  = s * q            stored code = q + 2^(b-1), zero point 2^(b-1)
    The sign of s sends the dominant extreme to -2^(b-1), so all 2^b levels are used.
    """
    half = 2 ** (bits - 1)
    if wmin is None or wmax is None:
        wmin, wmax = group_range(grouped)
    scale = sym_scale_of_range(wmin, wmax, alpha, beta, bits, scale_dtype, grouped.dtype)
    s3 = scale.unsqueeze(-1)
    x = grouped / s3
    if v is not None:
        x = x + v
    q = torch.clamp(round_ste(x), -half, half - 1)
    zp = torch.full_like(scale, float(half))
    return QdqResult(weight=s3 * q, scale=scale, zero_point=zp, q=(q + half).detach())


def qdq_int(grouped: torch.Tensor, bits: int, sym: bool, **kwargs) -> QdqResult:
    """Dispatch to the symmetric or asymmetric integer qdq."""
    fn = qdq_int_sym if sym else qdq_int_asym
    return fn(grouped, bits, **kwargs)


def quantize_weight_rtn(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, QdqResult, GroupLayout]:
    """Round-to-nearest qdq of a [out, in] weight. Returns (W^ [out, in], result, layout)."""
    layout = GroupLayout(weight.shape[0], weight.shape[1], group_size)
    res = qdq_int(layout.to_groups(weight.float()), bits, sym, scale_dtype=scale_dtype)
    return layout.from_groups(res.weight), res, layout
