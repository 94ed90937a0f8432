"""ggml block byte layouts (ggml-common.h): codes + GGUFParams <-> uint8 rows, exact round trips.

Per block (fp16 little-endian; L[i] = the stored code of element i of the block):

    q4_0  18 B  [d 2][qs 16]                 qs[j] = L[j] | L[j+16] << 4
    q4_1  20 B  [d 2][m 2][qs 16]
    q5_0  22 B  [d 2][qh 4][qs 16]           qs as q4_0 on the low nibbles; qh (uint32) bit i = L[i] >> 4
    q5_1  24 B  [d 2][m 2][qh 4][qs 16]
    q8_0  34 B  [d 2][qs 32 int8]           qs[i] = L[i] - 128 (our q8_0 codes are q + 128)
    q2_k  84 B  [scales 16][qs 64][d 2][dmin 2]
                scales[j] = sc[j] | m[j] << 4; for each 128-half h: qs[32h + l] = sum_k L[128h + 32k + l] << 2k
    q3_k 110 B  [hmask 32][qs 64][scales 12][d 2]
                low 2 bits as q2_k; hmask[l] bit b = bit 2 of L[32b + l]; 6-bit s = sc + 32:
                scales[i] (i < 8) = s[i] & 15 | (s[i+8] & 15) << 4, scales[8+i] = sum_k (s[4k+i] >> 4) << 2k
    q4_k 144 B  [d 2][dmin 2][scales 12][qs 128]
                qs[32c + l] = L[64c + l] | L[64c + 32 + l] << 4; 6-bit sc/m packed as
                scales[i] = sc[i] | (sc[i+4] >> 4) << 6, scales[4+i] = m[i] | (m[i+4] >> 4) << 6,
                scales[8+i] = sc[i+4] & 15 | (m[i+4] & 15) << 4   (i < 4)
    q5_k 176 B  [d 2][dmin 2][scales 12][qh 32][qs 128]   qh[l] bit b = bit 4 of L[32b + l]
    q6_k 210 B  [ql 128][qh 64][scales 16 int8][d 2]
                per 128-half h, quarter k: ql[64h + 32(k%2) + l] nibble k//2 = L[128h + 32k + l] & 15,
                qh[32h + l] bits 2k..2k+1 = L[128h + 32k + l] >> 4
"""

from __future__ import annotations

import numpy as np
import torch

from auto_round.quant.gguf import GGUFParams, build_params, ggml_type

# bytes per block, ggml-common.h (checked against gguf.GGML_QUANT_SIZES in the tests)
TYPE_SIZE = {
    "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34,
    "q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210,
}  # fmt: skip


def gguf_quant_type(qtype: str):
    """The gguf.GGMLQuantizationType member of a type name (needs the optional `gguf` package)."""
    import gguf

    return gguf.GGMLQuantizationType[ggml_type(qtype).name.upper()]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _fp16_bytes(x: torch.Tensor, what: str, qtype: str) -> np.ndarray:
    """float32 [...] -> uint8 [..., 2]; every value must already be an fp16 value."""
    a = _np(x).astype(np.float32)
    h = a.astype(np.float16)
    if not np.array_equal(h.astype(np.float32), a):
        raise ValueError(f"{qtype}: {what} holds values that are not exactly representable in fp16")
    return h.view(np.uint8).reshape(*a.shape, 2)


def _from_fp16(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0])


def _checked(x: torch.Tensor, lo: int, hi: int, what: str, qtype: str) -> np.ndarray:
    a = _np(x).astype(np.int64)
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{qtype}: {what} outside [{lo}, {hi}] (found {a.min()}..{a.max()})")
    return a


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return ((lo & 15) | ((hi & 15) << 4)).astype(np.uint8)


def _bit_planes(bits: np.ndarray) -> np.ndarray:
    """bits [N, 8, 32] (0/1) -> bytes [N, 32] with byte l bit b = bits[:, b, l]."""
    return (bits << np.arange(8).reshape(1, 8, 1)).sum(axis=1).astype(np.uint8)


def _crumbs(codes: np.ndarray) -> np.ndarray:
    """2-bit fields [N, 256] -> [N, 64]: byte 32h + l holds L[128h + 32k + l] at bits 2k (k = 0..3)."""
    c = (codes & 3).reshape(-1, 2, 4, 32)
    return (c << (2 * np.arange(4)).reshape(1, 1, 4, 1)).sum(axis=2).astype(np.uint8).reshape(-1, 64)


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit sc, m [N, 8] -> 12 bytes (get_scale_min_k4 layout)."""
    b0 = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b1 = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([b0, b1, b2], axis=1).astype(np.uint8)


def _unpack_k4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = b.astype(np.int64)
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:12] & 15) | ((b[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _pack_q3_scales(s: np.ndarray) -> np.ndarray:
    """6-bit s = sc + 32, [N, 16] -> 12 bytes."""
    low = _nibbles(s[:, :8], s[:, 8:])
    high = ((s >> 4).reshape(-1, 4, 4) << (2 * np.arange(4)).reshape(1, 4, 1)).sum(axis=1)
    return np.concatenate([low, high.astype(np.uint8)], axis=1)


def _unpack_q3_scales(b: np.ndarray) -> np.ndarray:
    b = b.astype(np.int64)
    low = np.concatenate([b[:, :8] & 15, b[:, :8] >> 4], axis=1)
    high = ((b[:, None, 8:12] >> (2 * np.arange(4)).reshape(1, 4, 1)) & 3).reshape(-1, 16)
    return low | (high << 4)


def pack_gguf(codes: torch.Tensor, params: GGUFParams) -> np.ndarray:
    """Codes [out, in] (as qdq returns them) + params -> uint8 [out, (in // block) * type_size]."""
    t = ggml_type(params.qtype)
    if codes.dim() != 2 or codes.shape[1] % t.block:
        raise ValueError(f"{t.name}: codes must be [out, in] with in a multiple of {t.block}; got {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    n = out_f * (in_f // t.block)  # blocks
    lo_code, hi_code = t.qmin + t.zero, t.qmax + t.zero
    L = _checked(codes, lo_code, hi_code, "codes", t.name).reshape(n, t.block)
    d = _fp16_bytes(params.d, "d", t.name).reshape(n, 2)
    if t.name == "q8_0":
        parts = [d, (L - 128).astype(np.int8).view(np.uint8)]
    elif not t.kquant:
        qs = _nibbles(L[:, :16], L[:, 16:])
        parts = [d]
        if not t.sym:
            parts.append(_fp16_bytes(params.dmin, "m", t.name).reshape(n, 2))
        if t.bits == 5:
            parts.append(np.packbits((L >> 4).astype(np.uint8), axis=1, bitorder="little"))
        parts.append(qs)
    else:
        sc_lo, sc_hi = t.sc_range
        sc = _checked(params.sc, sc_lo, sc_hi, "sc", t.name).reshape(n, t.subs_per_block)
        if not t.sym:
            m = _checked(params.m, sc_lo, sc_hi, "m", t.name).reshape(n, t.subs_per_block)
            dmin = _fp16_bytes(params.dmin, "dmin", t.name).reshape(n, 2)
        if t.name == "q2_k":
            parts = [(sc | (m << 4)).astype(np.uint8), _crumbs(L), d, dmin]
        elif t.name == "q3_k":
            hmask = _bit_planes(((L >> 2) & 1).reshape(n, 8, 32))
            parts = [hmask, _crumbs(L), _pack_q3_scales(sc + 32), d]
        elif t.name in ("q4_k", "q5_k"):
            c = L.reshape(n, 4, 2, 32)
            qs = _nibbles(c[:, :, 0], c[:, :, 1]).reshape(n, 128)
            parts = [d, dmin, _pack_k4_scales(sc, m)]
            if t.name == "q5_k":
                parts.append(_bit_planes(((L >> 4) & 1).reshape(n, 8, 32)))
            parts.append(qs)
        else:  # q6_k
            c = L.reshape(n, 2, 4, 32)
            ql = _nibbles(c[:, :, 0:2], c[:, :, 2:4]).reshape(n, 128)
            qh = ((c >> 4) << (2 * np.arange(4)).reshape(1, 1, 4, 1)).sum(axis=2).astype(np.uint8).reshape(n, 64)
            parts = [ql, qh, sc.astype(np.int8).view(np.uint8), d]
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == TYPE_SIZE[t.name], (t.name, blocks.shape)
    return blocks.reshape(out_f, -1)


def unpack_gguf(data: np.ndarray, qtype: str, in_features: int) -> tuple[torch.Tensor, GGUFParams]:
    """uint8 [out, (in // block) * type_size] -> (codes int32 [out, in], params): inverse of pack_gguf."""
    t = ggml_type(qtype)
    size = TYPE_SIZE[t.name]
    data = np.ascontiguousarray(data).view(np.uint8)
    if in_features % t.block or data.ndim != 2 or data.shape[1] != in_features // t.block * size:
        raise ValueError(
            f"{t.name}: data {data.shape} does not hold rows of {in_features} elements ({size} B per {t.block})"
        )
    out_f, nbr = data.shape[0], in_features // t.block
    b = data.reshape(out_f * nbr, size)
    n = b.shape[0]
    dmin = sc = m = None
    if t.name == "q8_0":
        d, L = _from_fp16(b[:, :2]), b[:, 2:].view(np.int8).astype(np.int64) + 128
    elif not t.kquant:
        d = _from_fp16(b[:, :2])
        pos = 2
        if not t.sym:
            dmin, pos = _from_fp16(b[:, 2:4]), 4
        high = np.zeros((n, 32), dtype=np.int64)
        if t.bits == 5:
            high = np.unpackbits(b[:, pos : pos + 4], axis=1, bitorder="little").astype(np.int64) << 4
            pos += 4
        qs = b[:, pos:].astype(np.int64)
        L = np.concatenate([qs & 15, qs >> 4], axis=1) | high
    else:
        if t.name == "q2_k":
            scb, qs, d, dmin = b[:, :16].astype(np.int64), b[:, 16:80], _from_fp16(b[:, 80:82]), _from_fp16(b[:, 82:84])
            sc, m = scb & 15, scb >> 4
            L = _uncrumb(qs)
        elif t.name == "q3_k":
            hmask, qs, d = b[:, :32], b[:, 32:96], _from_fp16(b[:, 108:110])
            sc = _unpack_q3_scales(b[:, 96:108]) - 32
            L = _uncrumb(qs) | (_unbit_planes(hmask) << 2)
        elif t.name in ("q4_k", "q5_k"):
            d, dmin = _from_fp16(b[:, 0:2]), _from_fp16(b[:, 2:4])
            sc, m = _unpack_k4_scales(b[:, 4:16])
            qs = b[:, -128:].astype(np.int64).reshape(n, 4, 1, 32)
            L = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 256)
            if t.name == "q5_k":
                L = L | (_unbit_planes(b[:, 16:48]) << 4)
        else:  # q6_k
            ql = b[:, :128].astype(np.int64).reshape(n, 2, 2, 32)
            qh = b[:, 128:192].astype(np.int64).reshape(n, 2, 1, 32)
            low = np.concatenate([ql & 15, ql >> 4], axis=2)  # (n, half, quarter, 32)
            high = (qh >> (2 * np.arange(4)).reshape(1, 1, 4, 1)) & 3
            L = (low | (high << 4)).reshape(n, 256)
            sc = b[:, 192:208].view(np.int8).astype(np.int64)
            d = _from_fp16(b[:, 208:210])
    codes = torch.from_numpy(L.reshape(out_f, in_features).astype(np.int32))

    def per_row(a):
        if a is None:
            return None
        a = torch.as_tensor(a)
        return a.reshape(out_f, -1)

    params = build_params(t.name, per_row(d), dmin=per_row(dmin), sc=per_row(sc), m=per_row(m))
    return codes, params


def _uncrumb(qs: np.ndarray) -> np.ndarray:
    """Inverse of _crumbs: [N, 64] -> 2-bit codes [N, 256]."""
    q = qs.astype(np.int64).reshape(-1, 2, 1, 32)
    return ((q >> (2 * np.arange(4)).reshape(1, 1, 4, 1)) & 3).reshape(-1, 256)


def _unbit_planes(b: np.ndarray) -> np.ndarray:
    """Inverse of _bit_planes: [N, 32] -> bits [N, 256] (element 32b + l from byte l bit b)."""
    q = b.astype(np.int64).reshape(-1, 1, 32)
    return ((q >> np.arange(8).reshape(1, 8, 1)) & 1).reshape(-1, 256)
