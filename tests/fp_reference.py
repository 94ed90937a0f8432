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
