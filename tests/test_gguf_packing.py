"""ggml block layouts: exact round trips, gguf-py decodes random packed blocks exactly, hand-checked bits."""

import numpy as np
import pytest
import torch

from auto_round.packing.gguf import TYPE_SIZE, gguf_quant_type, pack_gguf, unpack_gguf
from auto_round.quant.gguf import GGML_TYPES, build_params, ggml_type

gguf = pytest.importorskip("gguf")

TYPES = list(GGML_TYPES)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_fp16(shape, gen, lo=-2.0, hi=2.0):
    return (torch.rand(shape, generator=gen) * (hi - lo) + lo).half().float()


def random_packable(qtype, out_f, in_f, seed=0):
    """Random in-range codes and parameters (every field exercised, extremes included)."""
    t = ggml_type(qtype)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = t.qmin + t.zero, t.qmax + t.zero
    codes = torch.randint(lo, hi + 1, (out_f, in_f), generator=gen, dtype=torch.int32)
    codes[0, : t.block] = lo
    codes[-1, -t.block :] = hi
    nb, ns = in_f // t.block, in_f // t.sub
    d = random_fp16((out_f, nb), gen)
    dmin = None if t.sym else random_fp16((out_f, nb), gen)
    sc = m = None
    if t.kquant:
        sc_lo, sc_hi = t.sc_range
        sc = torch.randint(sc_lo, sc_hi + 1, (out_f, ns), generator=gen, dtype=torch.int32)
        sc[0, 0], sc[-1, -1] = sc_lo, sc_hi
        if not t.sym:
            m = torch.randint(sc_lo, sc_hi + 1, (out_f, ns), generator=gen, dtype=torch.int32)
            m[0, 0], m[-1, -1] = sc_hi, sc_lo
    return codes, build_params(qtype, d, dmin, sc, m)


def dequant_reference(codes, params):
    """W^ from codes and params in gguf-py's operation order (float32)."""
    t = ggml_type(params.qtype)
    q = (codes - t.zero).float().reshape(codes.shape[0], -1, t.sub)
    w = params.scale.unsqueeze(-1) * q
    if params.offset is not None:
        w = w - params.offset.unsqueeze(-1)
    return w.reshape(codes.shape)


def test_type_sizes_match_gguf():
    for name in TYPES:
        block, size = gguf.GGML_QUANT_SIZES[gguf_quant_type(name)]
        assert (block, size) == (ggml_type(name).block, TYPE_SIZE[name]), name


@pytest.mark.parametrize("shape", [(1, 256), (5, 512), (33, 768)])
@pytest.mark.parametrize("qtype", TYPES)
def test_round_trip_exact(qtype, shape):
    codes, params = random_packable(qtype, *shape, seed=shape[0])
    data = pack_gguf(codes, params)
    t = ggml_type(qtype)
    assert data.dtype == np.uint8 and data.shape == (shape[0], shape[1] // t.block * TYPE_SIZE[qtype])
    codes2, params2 = unpack_gguf(data, qtype, shape[1])
    assert torch.equal(codes2, codes)
    for field in ("scale", "offset", "d", "dmin", "sc", "m"):
        a, b = getattr(params, field), getattr(params2, field)
        assert (a is None and b is None) or torch.equal(a, b), (qtype, field)
    assert np.array_equal(pack_gguf(codes2, params2), data)
    assert np.array_equal(pack_gguf(codes.to(torch.uint8), params), data)  # every type's codes fit uint8


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_decodes_random_blocks_exactly(qtype):
    codes, params = random_packable(qtype, 7, 512, seed=3)
    theirs = gguf.quants.dequantize(pack_gguf(codes, params), gguf_quant_type(qtype))
    ours = dequant_reference(codes, params).numpy()
    bad = (ours.view(np.int32) != theirs.view(np.int32)).reshape(7, -1, ggml_type(qtype).block).any(-1).sum()
    assert bad == 0, f"{qtype}: {bad} blocks decode differently"


def one_block(qtype, **changes):
    """A single block, all codes at q = 0 (asym: code 0), d = 1, sc = 1, m = 0, dmin = 0; then `changes`."""
    t = ggml_type(qtype)
    codes = torch.full((1, t.block), t.zero, dtype=torch.int32)
    for i, c in changes.pop("codes", {}).items():
        codes[0, i] = c
    sc = torch.ones(1, t.subs_per_block, dtype=torch.int32) if t.kquant else None
    m = torch.zeros(1, t.subs_per_block, dtype=torch.int32) if t.kquant and not t.sym else None
    for j, s in changes.pop("sc", {}).items():
        sc[0, j] = s
    for j, s in changes.pop("m", {}).items():
        m[0, j] = s
    dmin = None if t.sym else torch.zeros(1, 1)
    return pack_gguf(codes, build_params(qtype, torch.ones(1, 1), dmin, sc, m))[0]


def test_bit_positions_by_hand():
    fp16_one = [0x00, 0x3C]
    b = one_block("q4_0", codes={1: 0x3, 17: 0xA})
    assert list(b[:2]) == fp16_one and b[2 + 1] == 0xA3 and b[2] == 0x88  # qs[j] = L[j] | L[j+16] << 4
    b = one_block("q5_0", codes={0: 0x1F, 3: 0x05, 20: 0x0A})  # bit 4 of element i -> qh bit i
    qh = int.from_bytes(bytes(b[2:6]), "little")
    assert qh == 0xFFFFFFFF & ~(1 << 3) & ~(1 << 20)  # q = 0 is code 16: bit 4 set everywhere else
    assert b[6] == 0x0F and b[6 + 3] == 0x05 and b[6 + 4] == 0xA0
    b = one_block("q8_0", codes={5: 128 - 7, 6: 255, 7: 0})  # code q + 128 -> int8 q
    assert b[2 + 5] == 256 - 7 and b[2 + 4] == 0 and b[2 + 6] == 127 and b[2 + 7] == 0x80
    b = one_block("q2_k", codes={32 + 3: 2, 128 + 96 + 1: 3}, sc={0: 5}, m={0: 9})
    assert b[0] == 0x95 and b[16 + 3] == 2 << 2 and b[16 + 32 + 1] == 3 << 6
    b = one_block("q3_k", codes={32 * 5 + 7: 0, 70: 7}, sc={9: -32, 14: 31})
    hmask, qs, scales = b[:32], b[32:96], b[96:108]
    assert hmask[7] == 0xFF & ~(1 << 5) and hmask[6] == 0xFF  # code 0 clears the high bit
    assert qs[6] == (3 << 4) | 0  # element 70 = half 0, quarter 2, l = 6 -> bits 4..5; others code 4 -> low bits 0
    # 6-bit s = sc + 32: s[9] = 0, s[14] = 63, all others 33
    assert scales[1] == (0 << 4) | 1 and scales[6] == (15 << 4) | 1
    assert scales[8 + 1] == (2 << 0) | (2 << 2) | (0 << 4) | (2 << 6)  # j = 1, 5, 9, 13 -> high bits of s
    assert scales[8 + 2] == (2 << 0) | (2 << 2) | (2 << 4) | (3 << 6)  # j = 2, 6, 10, 14
    b = one_block("q4_k", codes={64 + 32 + 2: 0xC}, sc={0: 63, 5: 0x2A}, m={6: 0x31})
    scales, qs = b[4:16], b[16:]
    assert scales[0] == 63 and scales[1] == 1 | ((0x2A >> 4) << 6) and scales[4 + 2] == 0 | ((0x31 >> 4) << 6)
    assert scales[8 + 1] == (0x2A & 15) and scales[8 + 2] == 1 | ((0x31 & 15) << 4)
    assert qs[32 + 2] == 0xC << 4
    b = one_block("q5_k", codes={32 * 6 + 9: 0x1F})
    assert b[16 + 9] == 1 << 6 and b[48 + 3 * 32 + 9] == 0x0F  # element 201: chunk 3, first half, l = 9
    b = one_block("q6_k", codes={128 + 64 + 4: 0x3F, 32 + 1: 0x05}, sc={15: -128})
    ql, qh, scales = b[:128], b[128:192], b[192:208]
    assert ql[64 + 4] == (0x0 | (0xF << 4)) and ql[32 + 1] == (0x5 | (0x0 << 4))
    assert qh[32 + 4] == (2 << 0) | (2 << 2) | (3 << 4) | (2 << 6)  # others code 32 -> high bits 2
    assert scales[15] == 0x80 and scales[0] == 1


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "q3_k", "q4_k", "q6_k"])
def test_pack_rejects_bad_input(qtype):
    t = ggml_type(qtype)
    codes, params = random_packable(qtype, 2, 256)
    bad = codes.clone()
    bad[0, 0] = t.qmax + t.zero + 1
    with pytest.raises(ValueError, match="codes"):
        pack_gguf(bad, params)
    bad_d = build_params(qtype, params.d + 1e-4, params.dmin, params.sc, params.m)
    with pytest.raises(ValueError, match="fp16"):
        pack_gguf(codes, bad_d)
    if t.kquant:
        sc = params.sc.clone()
        sc[0, 0] = t.sc_range[1] + 1
        with pytest.raises(ValueError, match="sc"):
            pack_gguf(codes, build_params(qtype, params.d, params.dmin, sc, params.m))
    with pytest.raises(ValueError, match=qtype):
        pack_gguf(codes[:, :-16], params)
    data = pack_gguf(codes, params)
    with pytest.raises(ValueError, match=qtype):
        unpack_gguf(data[:, :-1], qtype, 256)
