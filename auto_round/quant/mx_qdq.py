"""MX (OCP microscaling) qdq: one shared power-of-two (E8M0) scale per block of 32 along in_features.

Pure tensor math: no model, I/O or logging. Inputs are grouped like `int_qdq`: [rows, n_groups, G]
(G = 32 for the MX presets; zero padding of a ragged tail never changes a block's max).

Per block b with m = max|x_b| * max_scale * init_scale (m = 0 is replaced by 1 inside the log):

    floor rule (OCP, default):  e = clamp(floor(log2 m) - emax, -127, 127)
    rceil rule (NVIDIA):        e = clamp(ceil(log2(m / max_norm)), -127, 127)   (max_norm: 6 for FP4)
    scale   = 2^e,  E8M0 code = e + 127 (uint8, 0..254)
    element = quant_element(clamp(x / scale + V, -max_norm, max_norm))
    W^      = element * scale

quant_element rounds to the element format with ties to even: a float format (`fp_formats`) for
MXFP4/6/8, or the integer grid k / 2^(bits-2), |k| <= 2^(bits-1) - 1, for MXINT (max 1.984375 for
int8, 1.75 for int4). floor / ceil of the exponent use a straight-through estimator, so `max_scale`
(the only tuned clip parameter for MX; there is no min_scale) receives the gradient d scale/d max_scale
= scale / max_scale; V receives the element rounding's identity gradient (zero where clamped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .fp_formats import (E2M1, E2M3, E3M2, E4M3, E5M2, FloatFormat, ceil_log2, decode, encode, floor_log2,
                         round_to_format)

E8M0_BIAS = 127
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127  # code 255 is NaN
MX_BLOCK = 32


@dataclass(frozen=True)
class MxFormat:
    """An MX element type: a float element format, or (element=None) a signed integer of `int_bits`."""

    name: str
    element: Optional[FloatFormat]
    int_bits: int = 0

    @property
    def bits(self) -> int:
        return self.element.bits if self.element is not None else self.int_bits

    @property
    def int_step(self) -> float:
        """Grid step 2^-(bits-2) of MXINT elements (1/64 for int8, 1/4 for int4)."""
        return 2.0 ** -(self.int_bits - 2)

    @property
    def max_norm(self) -> float:
        if self.element is not None:
            return self.element.max_value
        return (2 ** (self.int_bits - 1) - 1) * self.int_step

    @property
    def emax(self) -> int:
        """Exponent of the largest element binade: 2 (FP4/FP6 e2m3), 4 (e3m2), 8 (e4m3), 15 (e5m2), 0 (int)."""
        return self.element.emax if self.element is not None else 0


MX_FORMATS: dict[str, MxFormat] = {
    f.name: f
    for f in (
        MxFormat("mx_fp4", E2M1),
        MxFormat("mx_fp6", E2M3),
        MxFormat("mx_fp6e3m2", E3M2),
        MxFormat("mx_fp8", E4M3),
        MxFormat("mx_fp8e5m2", E5M2),
        MxFormat("mx_int4", None, 4),
        MxFormat("mx_int8", None, 8),
    )
}


def get_mx_format(data_type: str, bits: Optional[int] = None) -> MxFormat:
    """'mx_fp' + bits 4/6/8 -> mx_fp4 / mx_fp6 / mx_fp8 ('mx_int' likewise); full names pass through."""
    name = data_type if bits is None or data_type in MX_FORMATS else f"{data_type}{bits}"
    if name not in MX_FORMATS:
        raise ValueError(f"unknown MX type {data_type!r} with bits={bits}; known: {sorted(MX_FORMATS)}")
    return MX_FORMATS[name]


def _floor_ste(y: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (exact.to(y.dtype) - y).detach() + y


def exact_exponent(safe: torch.Tensor, fmt: MxFormat, rule: str = "floor",
                   rceil_divisor: Optional[float] = None) -> torch.Tensor:
    """The unclamped shared exponent (float32 integers, no gradient) of block maxima `safe` > 0 [rows, n_groups]:
    floor(log2 safe) - emax ('floor') or ceil(log2(safe / d)), d = rceil_divisor or max_norm ('rceil');
    exact for subnormal maxima too (frexp)."""
    if rule == "floor":
        return (floor_log2(safe) - fmt.emax).float()
    if rule == "rceil":
        return ceil_log2(safe / (rceil_divisor if rceil_divisor is not None else fmt.max_norm)).float()
    raise ValueError(f"unknown MX scale rule {rule!r}; use 'floor' or 'rceil'")


def shared_exponent(amax: torch.Tensor, fmt: MxFormat, rule: str = "floor",
                    rceil_divisor: Optional[float] = None) -> torch.Tensor:
    """Per-block shared exponent e (float32 holding integers in [-127, 127]; STE gradient w.r.t. amax).

    amax: [rows, n_groups] block max |x| already multiplied by max_scale / init_scale (>= 0).
    rule 'floor': floor(log2 amax) - emax; rule 'rceil': ceil(log2(amax / d)), d = rceil_divisor or
    max_norm. amax == 0 is treated as 1 in both rules (the exponent of an all-zero block is arbitrary:
    every element is 0). floor / ceil are exact (`exact_exponent`), also for subnormal amax.
    """
    amax = amax.float().clamp(max=torch.finfo(torch.float32).max)  # an overflowed amax * c acts as fp32 max
    safe = torch.where(amax == 0, torch.ones_like(amax), amax)
    exact = exact_exponent(safe.detach(), fmt, rule, rceil_divisor)
    if rule == "floor":
        smooth = torch.log2(safe) - fmt.emax
    else:
        smooth = torch.log2(safe / (rceil_divisor if rceil_divisor is not None else fmt.max_norm))
    return torch.clamp(_floor_ste(smooth, exact), E8M0_MIN_EXP, E8M0_MAX_EXP)


def round_element(y: torch.Tensor, fmt: MxFormat) -> torch.Tensor:
    """Element rounding (no gradient) of y already clamped to +-max_norm: the float grid, or MXINT's k * 2^-(bits-2)."""
    if fmt.element is not None:
        return round_to_format(y, fmt.element)
    return torch.round(y / fmt.int_step) * fmt.int_step


def quant_element(x: torch.Tensor, fmt: MxFormat) -> torch.Tensor:
    """Element-domain rounding with STE: clamp to +-max_norm (zero gradient outside), then round."""
    x = torch.clamp(x, -fmt.max_norm, fmt.max_norm)
    return (round_element(x.detach(), fmt) - x).detach() + x


def element_codes(elements: torch.Tensor, fmt: MxFormat) -> torch.Tensor:
    """Codes a packer stores: uint8 bit patterns for float elements, int8 k (element = k * step) for MXINT."""
    elements = elements.detach()
    if fmt.element is not None:
        return encode(elements, fmt.element)
    return torch.round(elements / fmt.int_step).to(torch.int8)


@dataclass
class MxQdqResult:
    """MX qdq output. weight/codes: grouped shape; shared_exp/e8m0/scale: [rows, n_groups]."""

    weight: torch.Tensor  # dequantized W^, differentiable w.r.t. V and max_scale
    shared_exp: torch.Tensor  # int32 exponent e in [-127, 127]
    e8m0: torch.Tensor  # uint8 e + 127
    scale: torch.Tensor  # float32 2^e (detached)
    elements: torch.Tensor  # element values (detached), grouped shape
    fmt: MxFormat

    @property
    def codes(self) -> torch.Tensor:
        """See element_codes; encoded on demand (the tuning forward and activation qdq never read them)."""
        return element_codes(self.elements, self.fmt)


def mx_block_scale(x: torch.Tensor, fmt: MxFormat, *, max_scale: Optional[torch.Tensor] = None,
                   init_scale: Optional[torch.Tensor] = None, rule: str = "floor",
                   rceil_divisor: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e [rows, n_groups], scale = 2^e [rows, n_groups, 1]) of fp32 grouped x: the shared exponent of
    `qdq_mx`, differentiable w.r.t. max_scale / init_scale (and x, through the group max)."""
    # not detached: for activations the group max carries gradient to x, as in the reference (a weight's
    # amax is a constant either way)
    amax = x.abs().amax(dim=-1)  # [rows, n_groups]
    if max_scale is not None:
        amax = amax * max_scale
    if init_scale is not None:
        amax = amax * init_scale
    e = shared_exponent(amax, fmt, rule, rceil_divisor)
    return e, torch.exp2(e).unsqueeze(-1)  # exact powers of two (2^-127 is an fp32 subnormal)


def qdq_mx(
    grouped: torch.Tensor,
    fmt: MxFormat,
    *,
    v: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
    init_scale: Optional[torch.Tensor] = None,
    rule: str = "floor",
    rceil_divisor: Optional[float] = None,
) -> MxQdqResult:
    """MX qdq of [rows, n_groups, G] (module docstring). v: grouped shape; max_scale / init_scale:
    [rows, n_groups] (or broadcastable, e.g. a scalar) multipliers of the block max."""
    x = grouped.float()
    e, scale = mx_block_scale(x, fmt, max_scale=max_scale, init_scale=init_scale, rule=rule,
                              rceil_divisor=rceil_divisor)
    y = x / scale
    if v is not None:
        y = y + v
    elem = quant_element(y, fmt)
    e_int = e.detach().round().to(torch.int32)
    return MxQdqResult(weight=elem * scale, shared_exp=e_int, e8m0=(e_int + E8M0_BIAS).to(torch.uint8),
                       scale=scale.detach().squeeze(-1), elements=elem.detach(), fmt=fmt)


def dequant_mx(codes: torch.Tensor, e8m0: torch.Tensor, fmt: MxFormat) -> torch.Tensor:
    """What a loader computes: element(codes) * 2^(e8m0 - 127). codes grouped, e8m0 [rows, n_groups]."""
    elem = decode(codes, fmt.element) if fmt.element is not None else codes.float() * fmt.int_step
    return elem * torch.exp2(e8m0.float() - E8M0_BIAS).unsqueeze(-1)
