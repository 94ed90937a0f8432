"""Independent references for the FP / MX / NVFP tests: textbook value tables, brute-force rounding and
the MX exponent rules in plain Python (math.frexp on doubles), sharing no code with auto_round.quant."""

from __future__ import annotations

import itertools
import math

import numpy as np


def table(ebits: int, mbits: int, bias: int, max_value: float) -> list[tuple[float, int]]:
    """(value, code) for every non-negative finite value, from the textbook formula."""
    out = []
    for e, m in itertools.product(range(2**ebits), range(2**mbits)):
        val = (m / 2**mbits) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**mbits) * 2.0 ** (e - bias)
        if val <= max_value:
            out.append((val, (e << mbits) | m))
    return out


FP_PARAMS = {"e2m1": (2, 1, 1, 6.0), "e2m3": (2, 3, 1, 7.5), "e3m2": (3, 2, 3, 28.0),
             "e4m3": (4, 3, 7, 448.0), "e5m2": (5, 2, 15, 57344.0)}


def brute_round(x: np.ndarray, name: str) -> np.ndarray:
    """Nearest table value of min(|x|, max); a tie goes to the value whose code is even. Sign kept."""
    ebits, mbits, bias, max_value = FP_PARAMS[name]
    entries = table(ebits, mbits, bias, max_value)
    vals = np.array([v for v, _ in entries])
    codes = np.array([c for _, c in entries])
    flat = x.astype(np.float64).reshape(-1)
    out = np.empty_like(flat)
    for i, xi in enumerate(flat):
        d = np.abs(vals - min(abs(xi), max_value))
        cands = np.flatnonzero(d == d.min())
        pick = cands[0] if len(cands) == 1 else cands[codes[cands] % 2 == 0][0]
        out[i] = math.copysign(vals[pick], xi)
    return out.reshape(x.shape)


def ref_floor_exp(amax: float, emax: int) -> int:
    """OCP rule: clamp(floor(log2 amax) - emax, -127, 127); amax 0 -> log2 argument 1."""
    if amax == 0:
        amax = 1.0
    m, e = math.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)
    return max(-127, min(127, (e - 1) - emax))


def ref_rceil_exp(amax: float, max_norm: float) -> int:
    """RCEIL rule: clamp(ceil(log2(fp32(amax / max_norm))), -127, 127); amax 0 -> 1."""
    if amax == 0:
        amax = 1.0
    ratio = float(np.float32(amax) / np.float32(max_norm))
    m, e = math.frexp(ratio)
    return max(-127, min(127, e - 1 if m == 0.5 else e))


def nvfp4_reference_order(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """NVFP4 of grouped x [rows, n_groups, 16] with the reference kernel's fp32 operation order (the doc's
    formula, every product in float32): g = 2688 * (1 / amax), s_b = e4m3(clamp(g * (amax_b * fl(1/6)))),
    r = 1 / (s_b * (1 / g)), x_q = e2m1(clamp(x * r, -6, 6)). Returns (x_q, s_b, g)."""
    f32 = np.float32
    x = x.astype(f32)
    amax_t = np.abs(x).max()
    g = f32(2688.0) * (f32(1.0) / amax_t) if amax_t > 0 else f32(1.0)
    amax_b = np.abs(x).max(axis=-1)
    s_raw = np.clip(g * (amax_b * f32(1.0 / 6.0)), f32(-448.0), f32(448.0)).astype(f32)
    s_b = brute_round(s_raw, "e4m3").astype(f32)
    with np.errstate(divide="ignore"):
        r = np.where(s_b != 0, f32(1.0) / (s_b * (f32(1.0) / g)), f32(0.0)).astype(f32)
    y = np.clip(x * r[..., None], f32(-6.0), f32(6.0)).astype(f32)
    return brute_round(y, "e2m1").astype(f32), s_b, f32(g)
