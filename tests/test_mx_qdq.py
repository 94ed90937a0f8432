"""MX qdq against hand-computed exponents, a per-block Python reference (math.frexp exponents, brute-force
or torch-cast elements) and compressed-tensors' MX fake quantization."""

import numpy as np
import pytest
import torch

from auto_round.quant.int_qdq import GroupLayout
from auto_round.quant.mx_qdq import MX_FORMATS, dequant_mx, get_mx_format, qdq_mx, shared_exponent

from fp_reference import brute_round, ref_floor_exp, ref_rceil_exp

ELEM = {"mx_fp4": "e2m1", "mx_fp6": "e2m3", "mx_fp6e3m2": "e3m2", "mx_fp8": "e4m3", "mx_fp8e5m2": "e5m2"}
EMAX = {"mx_fp4": 2, "mx_fp6": 2, "mx_fp6e3m2": 4, "mx_fp8": 8, "mx_fp8e5m2": 15, "mx_int4": 0, "mx_int8": 0}
MAX_NORM = {"mx_fp4": 6.0, "mx_fp6": 7.5, "mx_fp6e3m2": 28.0, "mx_fp8": 448.0, "mx_fp8e5m2": 57344.0,
            "mx_int4": 1.75, "mx_int8": 1.984375}


def blocks(*rows):
    """[len(rows), 1, 32] from lists of leading values, the rest of each block filled with 0.01."""
    out = torch.full((len(rows), 1, 32), 0.01)
    for i, r in enumerate(rows):
        out[i, 0, : len(r)] = torch.tensor(r)
    return out


def ref_mx(grouped: torch.Tensor, name: str, rule: str = "floor") -> np.ndarray:
    """Per block: exponent by the Python rule, elements by brute force (fp) or k / 2^(bits-2) (int)."""
    g = grouped.numpy().astype(np.float64)
    out = np.empty_like(g)
    for r, c in np.ndindex(g.shape[:2]):
        amax = float(np.float32(np.abs(g[r, c]).max()))
        e = ref_floor_exp(amax, EMAX[name]) if rule == "floor" else ref_rceil_exp(amax, MAX_NORM[name])
        y = np.clip(g[r, c] / 2.0**e, -MAX_NORM[name], MAX_NORM[name])
        if name in ELEM:
            q = brute_round(y, ELEM[name])
        else:
            step = 2.0 ** -(int(name[len("mx_int"):]) - 2)  # 1/4 for int4, 1/64 for int8
            q = np.round(y / step) * step
        out[r, c] = q * 2.0**e
    return out


def test_format_table():
    for name, fmt in MX_FORMATS.items():
        assert (fmt.emax, fmt.max_norm) == (EMAX[name], MAX_NORM[name]), name
    assert get_mx_format("mx_fp", 4) is MX_FORMATS["mx_fp4"] and get_mx_format("mx_int", 8).name == "mx_int8"
    assert get_mx_format("mx_fp8e5m2").bits == 8
    with pytest.raises(ValueError):
        get_mx_format("mx_fp", 5)


# (amax, floor-rule exponent, rceil exponent) for MXFP4, worked by hand:
#   floor: floor(log2 amax) - 2;  rceil: ceil(log2(amax / 6))
FP4_EXP_CASES = [(6.0, 0, 0), (7.0, 0, 1), (4.0, 0, 0), (3.0, -1, -1), (3.1, -1, 0), (1.0, -2, -2),
                 (0.75, -3, -3), (12.0, 1, 1), (12.1, 1, 2), (0.0, -2, -2)]


@pytest.mark.parametrize("amax, e_floor, e_rceil", FP4_EXP_CASES)
def test_fp4_exponent_rules_by_hand(amax, e_floor, e_rceil):
    fmt = MX_FORMATS["mx_fp4"]
    a = torch.tensor([[amax]])
    assert shared_exponent(a, fmt, "floor").item() == e_floor
    assert shared_exponent(a, fmt, "rceil").item() == e_rceil


def test_fp8_exponent_rules_by_hand():
    fmt = MX_FORMATS["mx_fp8"]
    a = torch.tensor([[8.0, 500.0, 448.0, 449.0, 1.0]])
    assert shared_exponent(a, fmt, "floor").tolist() == [[-5, 0, 0, 0, -8]]  # floor(log2) - 8
    assert shared_exponent(a, fmt, "rceil").tolist() == [[-5, 1, 0, 1, -8]]  # ceil(log2(a / 448))
    # mx_fp4_rceil_v2 divides by 7.25: ceil(log2(7 / 7.25)) = 0, ceil(log2(7.3 / 7.25)) = 1
    fp4 = MX_FORMATS["mx_fp4"]
    assert shared_exponent(torch.tensor([[7.0, 7.3]]), fp4, "rceil", rceil_divisor=7.25).tolist() == [[0, 1]]


def test_e8m0_clamp_subnormal_and_huge():
    fp4, fp8, i8 = MX_FORMATS["mx_fp4"], MX_FORMATS["mx_fp8"], MX_FORMATS["mx_int8"]
    a = torch.tensor([[2.0**-149, 2.0**-126, 2.0**-124, 3e38, 2.0**127]])
    assert shared_exponent(a, fp4).tolist() == [[-127, -127, -126, 125, 125]]
    assert shared_exponent(a, fp8).tolist() == [[-127, -127, -127, 119, 119]]
    assert shared_exponent(a, i8).tolist() == [[-127, -126, -124, 127, 127]]
    assert shared_exponent(torch.tensor([[3.4e38]]), i8, "rceil").item() == 127  # ceil(log2(3.4e38 / 1.98)) = 127
    assert shared_exponent(torch.tensor([[2.0**-149]]), i8, "rceil").item() == -127  # ceil(-149.99) -> clamped
    # an overflowing tuned max (amax * 4 = inf) behaves like fp32 max
    assert shared_exponent(torch.tensor([[3e38]]) * 4, fp4).item() == 125
    r = qdq_mx(torch.full((1, 1, 32), 2.0**-140), fp4)
    assert r.shared_exp.item() == -127 and r.e8m0.item() == 0
    assert torch.equal(r.weight, torch.zeros(1, 1, 32))  # 2^-140 / 2^-127 = 2^-13 rounds to 0 in e2m1


@pytest.mark.parametrize("name", sorted(MX_FORMATS))
def test_zero_block(name):
    fmt = MX_FORMATS[name]
    r = qdq_mx(torch.zeros(2, 3, 32), fmt)
    assert torch.equal(r.weight, torch.zeros(2, 3, 32))
    assert (r.shared_exp == -EMAX[name]).all() and (r.e8m0 == 127 - EMAX[name]).all()
    assert (r.codes == 0).all()


@pytest.mark.parametrize("rule", ["floor", "rceil"])
@pytest.mark.parametrize("name", sorted(MX_FORMATS))
def test_qdq_matches_python_reference(name, rule):
    gen = torch.Generator().manual_seed(sorted(MX_FORMATS).index(name))
    w = torch.randn(3, 4, 32, generator=gen) * torch.exp2(torch.randint(-20, 20, (3, 4, 1), generator=gen).float())
    w[0, 0] = 0.0
    w[1, 1, :4] = torch.tensor([7.0, -6.5, 3.25, 1e-30])  # a saturating (floor) block with a tiny value
    r = qdq_mx(w, MX_FORMATS[name], rule=rule)
    np.testing.assert_array_equal(r.weight.numpy(), ref_mx(w, name, rule).astype(np.float32))
    assert torch.equal(dequant_mx(r.codes, r.e8m0, MX_FORMATS[name]), r.weight)


def test_mxfp8_round_trip_vs_torch_cast():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 8, 32, generator=gen) * 10.0
    r = qdq_mx(w, MX_FORMATS["mx_fp8"])
    e = torch.tensor([[ref_floor_exp(float(a), 8) for a in row] for row in w.abs().amax(-1)], dtype=torch.float32)
    scale = torch.exp2(e).unsqueeze(-1)
    want = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(r.weight, want)
    torch_bits = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    nonzero = want != 0  # torch encodes -0.0 as 0x80, ours as 0x00
    assert torch.equal(r.codes[nonzero], torch_bits[nonzero]) and (r.codes[~nonzero] == 0).all()


def test_fp4_elements_and_codes_by_hand():
    # amax 5.0 -> e = floor(log2 5) - 2 = 0 -> scale 1; the elements are the e2m1 rounding of the values
    w = blocks([5.0, -0.25, 0.4, 1.25, 2.5, -5.1, 3.5])
    r = qdq_mx(w, MX_FORMATS["mx_fp4"])
    assert r.shared_exp.item() == 0 and r.e8m0.item() == 127
    assert r.weight[0, 0, :7].tolist() == [4.0, -0.0, 0.5, 1.0, 2.0, -6.0, 4.0]
    assert r.codes[0, 0, :7].tolist() == [6, 0, 1, 2, 4, 15, 6]
    # amax 7 saturates under the floor rule (7 -> 6) but not under rceil (scale 2, 7/2 = 3.5 -> 4 -> 8)
    w = blocks([7.0, 1.0])
    assert qdq_mx(w, MX_FORMATS["mx_fp4"]).weight[0, 0, :2].tolist() == [6.0, 1.0]
    assert qdq_mx(w, MX_FORMATS["mx_fp4"], rule="rceil").weight[0, 0, :2].tolist() == [8.0, 1.0]


def test_mxint8_grid():
    # amax 1.5 -> e = 0; elements k/64 clamped to 127/64
    w = blocks([1.5, 1.999, 0.5 / 64 * 3, -1.0 / 128])
    r = qdq_mx(w, MX_FORMATS["mx_int8"])
    assert r.shared_exp.item() == 0
    assert r.weight[0, 0, :4].tolist() == [1.5, 127 / 64, 2 / 64, -0.0]  # 1.5/64 ties to 2/64, 0.5/64 ties to 0
    assert r.codes.dtype == torch.int8 and r.codes[0, 0, :4].tolist() == [96, 127, 2, 0]


def test_padding_of_ragged_tail_keeps_exponents():
    w = torch.randn(4, 40)
    layout = GroupLayout(4, 40, 32)
    r = qdq_mx(layout.to_groups(w), MX_FORMATS["mx_fp4"])
    tail = w[:, 32:].abs().amax(-1)
    assert r.shared_exp[:, 1].tolist() == [ref_floor_exp(float(a), 2) for a in tail]
    assert layout.from_groups(r.weight).shape == (4, 40)


@pytest.mark.parametrize("name", ["mx_fp4", "mx_fp8", "mx_int4"])
def test_gradients_reach_v_and_max_scale(name):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(4, 2, 32, generator=gen)
    v = torch.zeros_like(w, requires_grad=True)
    ms = torch.ones(4, 2, requires_grad=True)
    r = qdq_mx(w, MX_FORMATS[name], v=v, max_scale=ms)
    ((r.weight - w) ** 2).sum().backward()
    assert v.grad.abs().sum() > 0 and ms.grad.abs().sum() > 0
    assert torch.isfinite(v.grad).all() and torch.isfinite(ms.grad).all()
    # the exponent's straight-through floor: d scale / d max_scale = scale / max_scale
    ms2 = torch.tensor([[0.5]], requires_grad=True)
    x = torch.full((1, 1, 32), 0.0)
    x[0, 0, 0] = 100.0  # with ms 0.5 it saturates: W^_0 = max_norm * scale, d W^_0 / d ms = max_norm * scale / ms
    r2 = qdq_mx(x, MX_FORMATS[name], max_scale=ms2)
    r2.weight[0, 0, 0].backward()
    fmt = MX_FORMATS[name]
    assert ms2.grad.item() == pytest.approx(fmt.max_norm * r2.scale.item() / 0.5, rel=1e-5)
    assert r2.weight[0, 0, 0].item() == fmt.max_norm * r2.scale.item()


def test_v_shifts_elements():
    w = blocks([4.0, 1.25])  # scale 1; 1.25 ties to 1.0, with V = +0.01 it rounds to 1.5
    v = torch.zeros_like(w)
    v[0, 0, 1] = 0.01
    assert qdq_mx(w, MX_FORMATS["mx_fp4"], v=v).weight[0, 0, 1].item() == 1.5
    # init_scale multiplies the block max like max_scale: 4 * 2 = 8 -> e = 1 -> scale 2, 1.25/2 -> 0.5 -> 1.0
    r = qdq_mx(w, MX_FORMATS["mx_fp4"], init_scale=torch.tensor([[2.0]]))
    assert r.shared_exp.item() == 1 and r.weight[0, 0, :2].tolist() == [4.0, 1.0]


@pytest.mark.parametrize("name, bits", [("mx_fp4", 4), ("mx_fp6", 6), ("mx_fp8", 8)])
def test_elements_match_compressed_tensors(name, bits):
    """CT's MX fake quantization, given our power-of-two scales, reproduces our weights exactly."""
    forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization import QuantizationArgs

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 64, generator=gen) * 3
    layout = GroupLayout(8, 64, 32)
    r = qdq_mx(layout.to_groups(w), MX_FORMATS[name])
    args = QuantizationArgs(num_bits=bits, type="float", strategy="group", group_size=32, scale_dtype=torch.uint8,
                            zp_dtype=torch.uint8)
    ref = forward.fake_quantize(w, r.scale, None, args)
    assert torch.equal(ref, layout.from_groups(r.weight))


@pytest.mark.parametrize("bits, threshold", [(4, 1.75), (8, 1.75), (6, 1.9375)])
def test_scale_rule_vs_compressed_tensors(bits, threshold):
    """CT rounds the block max to a power of two before flooring: it agrees with the OCP floor rule while
    amax / 2^floor(log2 amax) < threshold and picks the next exponent (no saturation) above it."""
    helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    from compressed_tensors.quantization import QuantizationArgs

    name = {4: "mx_fp4", 6: "mx_fp6", 8: "mx_fp8"}[bits]
    args = QuantizationArgs(num_bits=bits, type="float", strategy="group", group_size=32, scale_dtype=torch.uint8,
                            zp_dtype=torch.uint8)
    mant = torch.tensor([1.0, 1.3, threshold - 0.01, threshold, 1.99])
    amax = (mant * torch.tensor([[2.0**-3], [1.0], [2.0**5]])).reshape(1, -1)
    ct_scale, _ = helpers.calculate_qparams(-amax, amax, args)
    ours = torch.exp2(shared_exponent(amax, MX_FORMATS[name]))
    below = (mant < threshold).repeat(3).reshape(1, -1)
    assert torch.equal(ct_scale[below], ours[below])
    assert torch.equal(ct_scale[~below], 2 * ours[~below])
