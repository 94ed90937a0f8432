"""Element formats against independent references: a hand-written value table and brute-force nearest
search (ties to the even mantissa code), torch's own float8 casts, and compressed-tensors' fp4/fp6 casts."""

import numpy as np
import pytest
import torch

from auto_round.quant.fp_formats import (E2M1, E2M3, E3M2, E4M3, E5M2, FORMATS, FloatFormat, ceil_log2, decode, encode,
                                         encode_fields, floor_log2, get_format, representable_values, round_to_format,
                                         round_to_format_ste)

from fp_reference import brute_round, table

TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def probe_points(fmt, n_random: int = 400, seed: int = 0) -> torch.Tensor:
    """All values, all midpoints (ties), midpoints +- one fp32 ulp, random log-uniform values, both signs."""
    vals = representable_values(fmt)
    mids = (vals[1:] + vals[:-1]) / 2
    up = torch.nextafter(mids, torch.full_like(mids, float("inf")))
    down = torch.nextafter(mids, torch.zeros_like(mids))
    gen = torch.Generator().manual_seed(seed)
    lo, hi = np.log2(fmt.min_subnormal) - 2, np.log2(fmt.max_value)
    rand = torch.exp2(torch.rand(n_random, generator=gen) * (hi - lo) + lo)
    pts = torch.cat([vals, mids, up, down, rand, torch.tensor([fmt.max_value * 1.01, 1e30, 0.0])])
    return torch.cat([pts, -pts])


def test_e2m1_value_table():
    assert representable_values(E2M1).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert [v for v, _ in table(2, 1, 1, 6.0)] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize("x, want", [(0.25, 0.0), (0.4, 0.5), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0),
                                     (3.5, 4.0), (5.0, 4.0), (5.1, 6.0), (7.0, 6.0), (1e9, 6.0), (0.0, 0.0)])
def test_e2m1_rounding_cases(x, want):
    got = round_to_format(torch.tensor([x, -x]), E2M1)
    assert got.tolist() == [want, -want]


@pytest.mark.parametrize("name, max_value", [("e2m1", 6.0), ("e2m3", 7.5), ("e3m2", 28.0), ("e4m3", 448.0),
                                             ("e5m2", 57344.0)])
def test_format_constants(name, max_value):
    fmt = get_format(name)
    assert fmt.max_value == max_value == representable_values(fmt).max().item()
    assert len(representable_values(fmt)) == len(table(fmt.ebits, fmt.mbits, fmt.bias, fmt.max_value))
    assert fmt.emax == int(np.floor(np.log2(max_value)))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_round_matches_brute_force(name):
    fmt = FORMATS[name]
    x = probe_points(fmt, n_random=150)
    np.testing.assert_array_equal(round_to_format(x, fmt).numpy(), brute_round(x.numpy(), name))


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_round_matches_torch_float8_cast(name):
    fmt = FORMATS[name]
    x = probe_points(fmt, n_random=20000, seed=1)
    x = x[x.abs() <= fmt.max_value]  # torch saturates e4m3fn but overflows e5m2 to inf above the range
    want = x.to(TORCH_FP8[name]).float()
    got = round_to_format(x, fmt)
    bad = got != want
    assert not bad.any(), f"{int(bad.sum())} mismatches, e.g. x={x[bad][:5].tolist()} got={got[bad][:5].tolist()}"


def test_saturation_and_sign():
    assert round_to_format(torch.tensor([500.0, -1e6]), E4M3).tolist() == [448.0, -448.0]
    assert round_to_format(torch.tensor([6e4, 1e30]), E5M2).tolist() == [57344.0, 57344.0]
    assert round_to_format(torch.tensor([30.0, -7.6]), E3M2).tolist() == [28.0, -8.0]
    assert round_to_format(torch.tensor([7.7]), E2M3).tolist() == [7.5]
    assert torch.signbit(round_to_format(torch.tensor([-0.1]), E2M1)).item()  # -0.0 keeps its sign


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_encode_decode_roundtrip_against_table(name):
    fmt = FORMATS[name]
    vals, codes = zip(*table(fmt.ebits, fmt.mbits, fmt.bias, fmt.max_value))
    v = torch.tensor(vals)
    sign_bit = 1 << (fmt.ebits + fmt.mbits)
    assert encode(v, fmt).tolist() == list(codes)
    nz = v[v > 0]
    assert encode(-nz, fmt).tolist() == [c | sign_bit for v_, c in zip(vals, codes) if v_ > 0]
    assert torch.equal(decode(encode(v, fmt), fmt), v)
    assert torch.equal(decode(encode(-nz, fmt), fmt), -nz)
    assert encode(torch.tensor([-0.0, 0.0]), fmt).tolist() == [0, 0]  # -0.0 encodes as +0
    both = torch.cat([v, -nz, torch.tensor([-0.0])])
    assert torch.equal(encode_fields(both, fmt), encode(both, fmt))  # torch's cast / the e4m3 table against the fields


def test_e2m1_codes_are_table_index_with_sign_bit3():
    v = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert encode(v, E2M1).tolist() == list(range(8))
    assert encode(-v[1:], E2M1).tolist() == [8 + i for i in range(1, 8)]


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_codes_equal_torch_float8_bits(name):
    fmt = FORMATS[name]
    v = representable_values(fmt)
    v = torch.cat([v, -v[1:]])
    assert torch.equal(encode(v, fmt), v.to(TORCH_FP8[name]).view(torch.uint8))


def test_exact_log2_helpers():
    x = torch.tensor([1.0, 1.5, 2.0, 7.0, 8.0, 0.75, 2.0**-149, 2.0**-127, 3e38, 2.0**24 - 1])
    assert floor_log2(x).tolist() == [0, 0, 1, 2, 3, -1, -149, -127, 127, 23]
    assert ceil_log2(x).tolist() == [0, 1, 1, 3, 3, 0, -149, -127, 128, 24]
    assert floor_log2(torch.tensor([0.0])).tolist() == [0]


def test_ste_gradient_is_identity():
    x = torch.tensor([0.3, 1.2, -2.6, 5.5], requires_grad=True)
    y = round_to_format_ste(x, E2M1)
    assert y.tolist() == [0.5, 1.0, -3.0, 6.0]
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_against_compressed_tensors_fp4_fp6_casts():
    fp4_utils = pytest.importorskip("compressed_tensors.quantization.utils.fp4_utils")
    fp6_utils = pytest.importorskip("compressed_tensors.quantization.utils.fp6_utils")
    for fmt, cast in ((E2M1, fp4_utils.cast_to_fp4), (E2M3, fp6_utils.cast_to_fp6)):
        x = probe_points(fmt, n_random=500, seed=2).clamp(-fmt.max_value, fmt.max_value)
        # CT's fp4 cast returns x * sign(x): +0.0 for -0.0 inputs; compare values, not zero signs
        assert torch.equal(round_to_format(x, fmt) + 0.0, cast(x.clone()) + 0.0), fmt.name


@pytest.mark.parametrize("name", ["e2m1", "e2m3", "e3m2"])
def test_encode_of_random_rounded_values_equals_the_field_arithmetic(name):
    # the table path of `encode` on a realistic tensor (weights rounded to the format, ties, zeros, saturation)
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(3)
    x = round_to_format(torch.randn(64, 96, generator=g) * fmt.max_value / 2, fmt)
    assert torch.equal(encode(x, fmt), encode_fields(x, fmt))
    assert torch.equal(decode(encode(x, fmt), fmt), x + 0.0)


def test_a_format_outside_e4m3_is_encoded_from_its_fields():
    # a 7-bit e5m1 reaches past e4m3's 448, so encode cannot go through e4m3 codes
    wide = FloatFormat("e5m1", 5, 1, 15, 49152.0)
    v = representable_values(wide)
    v = torch.cat([v, -v[1:]])
    assert torch.equal(encode(v, wide), encode_fields(v, wide))
    assert torch.equal(decode(encode(v, wide), wide), v)
