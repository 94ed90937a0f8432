"""Small floating-point element formats (FP4 / FP6 / FP8) as data, plus exact rounding to them.

Pure tensor math: no model, I/O or logging. All functions take and return float32 values.

A format with E exponent bits, M explicit mantissa bits and exponent bias b represents

    normal     (-1)^s * 2^(e - b) * (1 + m / 2^M),   e in [1, e_top], m in [0, 2^M - 1]
    subnormal  (-1)^s * 2^(1 - b) * (m / 2^M),       e = 0

up to `max_value` (the largest finite value; for e4m3fn the all-ones exponent is still used for
finite values, only S.1111.111 is NaN; e5m2 keeps IEEE inf/NaN in its top exponent).

Rounding (`round_to_format`): for |x| with floor(log2|x|) = k, clipped below at the minimum normal
exponent k_min = 1 - b, the grid step is 2^(k - M); |x| is rounded to a multiple of that step with
round-half-to-even (torch.round) and saturated at max_value. The ties-to-even rule on the multiple is
the IEEE rule on the mantissa, a carry into the next binade is exact, and subnormals fall out of the
clipped exponent. For e4m3fn / e5m2 this equals `x.to(torch.float8_*).float()` for |x| <= max_value.

Bit codes (`encode` / `decode`) are the (1 + E + M)-bit patterns sign | exponent | mantissa, stored in
uint8; for e2m1 this is the index into {0, .5, 1, 1.5, 2, 3, 4, 6} with the sign in bit 3.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    """An element format: exponent bits, explicit mantissa bits, bias and largest finite value."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max_value: float

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def min_normal_exp(self) -> int:
        """k_min = 1 - bias: the exponent of the smallest normal value, also the subnormal exponent."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """floor(log2(max_value)): the exponent of the largest binade (the MX `emax`)."""
        return math.frexp(self.max_value)[1] - 1  # plain Python: no tensor (and no graph break when compiled)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.min_normal_exp - self.mbits)


E2M1 = FloatFormat("e2m1", 2, 1, 1, 6.0)
E2M3 = FloatFormat("e2m3", 2, 3, 1, 7.5)
E3M2 = FloatFormat("e3m2", 3, 2, 3, 28.0)
E4M3 = FloatFormat("e4m3", 4, 3, 7, 448.0)  # float8_e4m3fn: no inf, max 448
E5M2 = FloatFormat("e5m2", 5, 2, 15, 57344.0)  # float8_e5m2 (IEEE-like), max finite 57344

FORMATS: dict[str, FloatFormat] = {f.name: f for f in (E2M1, E2M3, E3M2, E4M3, E5M2)}

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code order (bits 0..2)


def get_format(name: str) -> FloatFormat:
    """Look a format up by name ('e2m1', 'e2m3', 'e3m2', 'e4m3', 'e5m2'); fails naming the choices."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown float element format {name!r}; known: {sorted(FORMATS)}") from None


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2(x)) for x > 0 (subnormals included) as int32, via frexp; 0 for x == 0."""
    exp = torch.frexp(x).exponent - 1
    return torch.where(x == 0, torch.zeros_like(exp), exp)


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(x)) for x > 0 as int32 (x a power of two: its exponent); 0 for x == 0."""
    mant, exp = torch.frexp(x)
    exp = torch.where(mant.abs() == 0.5, exp - 1, exp)
    return torch.where(x == 0, torch.zeros_like(exp), exp)


def _grid_step(a: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """2^(max(floor(log2 a), k_min) - M): the spacing of representable values around |x| = a (a >= 0, fp32).

    2^floor(log2 a) is a's fp32 bit pattern with the mantissa cleared (0 for fp32 subnormals and 0,
    which the clamp at the format's subnormal step then covers): three cheap passes, no frexp / where.
    """
    binade = torch.bitwise_and(a.contiguous().view(torch.int32), 0x7F800000).view(torch.float32)
    return binade.mul_(2.0**-fmt.mbits).clamp_(min=2.0 ** (fmt.min_normal_exp - fmt.mbits))


def round_to_format(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Nearest representable value of `fmt` (ties to even), saturating at +-max_value. No gradient.

    x: any shape, float32. Returns float32, same shape; sign (including -0.0) is kept. max_value is a
    grid point, so a value clamped to it never rounds past it.
    """
    x = x.float()
    a = x.abs().clamp_(max=fmt.max_value)
    step = _grid_step(a, fmt)
    q = a.div_(step).round_().mul_(step)  # a / step and q are exact in fp32
    return torch.copysign(q, x)


def round_to_format_ste(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """`round_to_format` in the forward pass, identity gradient in the backward pass."""
    return (round_to_format(x.detach(), fmt) - x).detach() + x


# torch's own 8-bit float types with the same bit layout: their cast is exact on representable values
_TORCH_FLOAT8 = {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2}


def encode(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Bit codes (uint8, same shape) of values that are already representable in `fmt`.

    code = s << (E + M) | e << M | m, with s = 1 only for values < 0 (so -0.0 encodes as +0).
    Computed without the bit arithmetic of `encode_fields` (~10 passes; a SmolLM2 MXFP8 export spent 30 % of
    its RTN time there): e4m3 / e5m2 are torch's float8 cast; e2m1 / e2m3 / e3m2 values are all exact in
    e4m3 (fewer exponent and mantissa bits), so their e4m3 code indexes a 256-entry table (6-7x faster).
    """
    native = _TORCH_FLOAT8.get(fmt)
    if native is None and not _fits_in_e4m3(fmt):
        return encode_fields(values, fmt)
    exact = values.float() + 0.0  # -0.0 becomes +0.0
    if native is not None:
        return exact.to(native).view(torch.uint8)
    e4m3_codes = exact.to(torch.float8_e4m3fn).view(torch.uint8).int()
    return _codes_from_e4m3(fmt, str(values.device))[e4m3_codes]


def _fits_in_e4m3(fmt: FloatFormat) -> bool:
    """Every value of fmt is an e4m3 value: no more mantissa bits, range and finest step inside e4m3's."""
    return fmt.mbits <= E4M3.mbits and fmt.max_value <= E4M3.max_value and fmt.min_subnormal >= E4M3.min_subnormal


@functools.lru_cache(maxsize=None)
def _codes_from_e4m3(fmt: FloatFormat, device: str) -> torch.Tensor:
    """uint8 [256]: the `fmt` code of each e4m3 code's value (0 where that value is not in the format)."""
    values = decode(torch.arange(256, dtype=torch.int32), E4M3)
    exact = (values.abs() <= fmt.max_value) & (round_to_format(values, fmt) == values)
    return torch.where(exact, encode_fields(values, fmt), torch.zeros((), dtype=torch.uint8)).to(device)


def encode_fields(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """`encode` for any format, from the sign / exponent / mantissa fields."""
    a = values.float().abs()
    k = torch.clamp(floor_log2(a), min=fmt.min_normal_exp)
    normal = a >= 2.0**fmt.min_normal_exp
    mant_units = torch.round(torch.ldexp(a, fmt.mbits - k)).to(torch.int32)  # includes the implicit 1
    exp_field = torch.where(normal, k + fmt.bias, torch.zeros_like(k))
    mant_field = torch.where(normal, mant_units - (1 << fmt.mbits), mant_units)
    sign = (values < 0).to(torch.int32)
    code = (sign << (fmt.ebits + fmt.mbits)) | (exp_field << fmt.mbits) | mant_field
    return code.to(torch.uint8)


def decode(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Float32 values of bit codes (inverse of `encode`; NaN / inf codes are not given a meaning)."""
    c = codes.to(torch.int32)
    mant_field = c & ((1 << fmt.mbits) - 1)
    exp_field = (c >> fmt.mbits) & ((1 << fmt.ebits) - 1)
    sign = (c >> (fmt.ebits + fmt.mbits)) & 1
    normal = exp_field > 0
    mant = torch.where(normal, mant_field + (1 << fmt.mbits), mant_field).float()
    k = torch.where(normal, exp_field - fmt.bias, torch.full_like(exp_field, fmt.min_normal_exp))
    mag = torch.ldexp(mant, k - fmt.mbits)
    return torch.where(sign == 1, -mag, mag)


def representable_values(fmt: FloatFormat) -> torch.Tensor:
    """All non-negative finite values of `fmt` up to max_value, sorted ascending (float32)."""
    codes = torch.arange(0, 1 << (fmt.ebits + fmt.mbits), dtype=torch.int32)
    vals = decode(codes, fmt)
    return torch.unique(vals[vals <= fmt.max_value])
