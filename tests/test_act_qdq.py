"""Activation qdq against per-token / per-tensor / per-group references written out by hand (NumPy int sym,
float8 casts, Python MX exponents), hand-worked NVFP4 static cases, and compressed-tensors' dynamic fp8 /
NVFP4 activation quantization."""

import numpy as np
import pytest
import torch

from auto_round.quant.act_qdq import qdq_act

from fp_reference import brute_round, ref_floor_exp, ref_rceil_exp


def acts(shape=(2, 3, 64), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    x[0, 0, 5] = 20.0  # an outlier token
    return x


def ref_int_sym_rows(rows: np.ndarray, bits: int) -> np.ndarray:
    """Full-range sym per row: s = fp16(-max+ / 2^(b-1)) if the positive side dominates (ties too), else
    fp16(|min-| / 2^(b-1)); q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)."""
    half = 2 ** (bits - 1)
    out = np.empty_like(rows)
    for i, r in enumerate(rows):
        pos, neg = max(r.max(), 0.0), -min(r.min(), 0.0)
        s = np.float32(np.float16(np.float32(-pos if pos >= neg else neg) / np.float32(half)))
        out[i] = s * np.clip(np.round(r / s), -half, half - 1)
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_int_sym_per_token(bits):
    x = acts()
    got = qdq_act(x, "int", bits, -1)
    want = ref_int_sym_rows(x.reshape(-1, 64).numpy(), bits).reshape(x.shape)
    np.testing.assert_array_equal(got.numpy(), want)


def test_int_sym_per_tensor_and_per_group():
    x = acts()
    flat = x.reshape(1, -1).numpy()
    np.testing.assert_array_equal(qdq_act(x, "int", 8, 0).numpy(), ref_int_sym_rows(flat, 8).reshape(x.shape))
    groups = x.reshape(-1, 16).numpy()  # hidden 64 -> 4 groups of 16 per token
    np.testing.assert_array_equal(qdq_act(x, "int", 8, 16).numpy(), ref_int_sym_rows(groups, 8).reshape(x.shape))


def test_int_asym_per_token():
    x = acts()
    got = qdq_act(x, "int", 8, -1, sym=False).reshape(-1, 64).numpy()
    for row, g in zip(x.reshape(-1, 64).numpy(), got):
        lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
        s = np.float32(max(np.float16(np.float32(hi - lo) / np.float32(255)), np.float16(1e-5)))
        zp = np.clip(np.round(-lo / s), 0, 255)
        np.testing.assert_array_equal(g, s * (np.clip(np.round(row / s) + zp, 0, 255) - zp))


@pytest.mark.parametrize("group_size", [0, -1, 32])
def test_fp8_dynamic(group_size):
    x = acts()
    view = {0: x.reshape(1, -1), -1: x.reshape(-1, 64), 32: x.reshape(-1, 32)}[group_size]
    s = (view.abs().amax(-1, keepdim=True) / 448).clamp(min=1 / (448 * 512))
    want = ((view / s).to(torch.float8_e4m3fn).float() * s).reshape(x.shape)
    assert torch.equal(qdq_act(x, "fp", 8, group_size), want)
    assert torch.equal(qdq_act(x, "fp8_e4m3", 8, group_size), want)


def test_fp8_static_saturates_and_gradients():
    x = torch.tensor([[0.5, -1.0, 3.0, -7.0]], requires_grad=True)
    act_max = torch.tensor(2.0)  # calibrated: scale 2/448; 3 and -7 saturate at +-2
    ms = torch.tensor(1.0, requires_grad=True)
    y = qdq_act(x, "fp", 8, 0, act_max=act_max, max_scale=ms)
    s = 2.0 / 448
    want = (torch.tensor([[0.5, -1.0, 2.0, -2.0]]) / s).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(y.detach(), want)
    (y * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert x.grad.tolist() == [[1.0, 2.0, 0.0, 0.0]]  # identity inside the range, zero where clamped
    assert ms.grad.item() != 0.0


def test_dynamic_gradient_straight_through_off_the_group_max():
    x = acts().requires_grad_(True)
    for dt, bits, g in (("int", 8, -1), ("fp", 8, 0), ("mx_fp", 4, 32), ("nv_fp", 4, 16)):
        x.grad = None
        qdq_act(x, dt, bits, g).sum().backward()
        view = x.detach().reshape(1, -1) if g == 0 else x.detach().reshape(-1, 64 if g == -1 else g)
        grad = x.grad.reshape(view.shape)
        # rounding is straight-through: 1 away from the group's extreme (which can be clamped by rounding)
        inside = view.abs() < 0.7 * view.abs().amax(-1, keepdim=True)
        assert (grad[inside] == 1).all(), dt
        # the range keeps its gradient (reference behaviour): some group max gets the scale's term
        at_max = view.abs() == view.abs().amax(-1, keepdim=True)
        assert not set(grad[at_max].unique().tolist()) <= {0.0, 1.0}, dt  # not only the STE's 0 / 1


def test_mx_gradient_through_the_shared_exponent():
    """q = R(clamp(x / s, +-6)) s, s = 2^(floor(log2 amax) - 2), straight-through floor and R. Per element
    dq_j / d amax = (dq_j / ds)(s / amax), with dq_j / ds = (q_j - x_j) / s inside the clamp and q_j / s where
    clamped; the group max adds its own direct term (1 inside the clamp, 0 clamped)."""
    x = acts(seed=3).reshape(-1, 32)[:6].clone().requires_grad_(True)
    q = qdq_act(x, "mx_fp", 4, 32)
    q.sum().backward()
    xd, qd = x.detach(), q.detach()
    amax, arg = xd.abs().max(-1)
    s = torch.exp2(torch.floor(torch.log2(amax)) - 2)[:, None]
    clamped = (xd / s).abs() > 6
    dq_ds = torch.where(clamped, qd / s, (qd - xd) / s)
    sign = torch.sign(xd.gather(-1, arg[:, None])).squeeze(-1)
    direct = (~clamped).float().gather(-1, arg[:, None]).squeeze(-1)
    want = direct + sign * (dq_ds * s).sum(-1) / amax
    assert clamped.any()  # the case the clamp branch is about occurs in this data
    got = x.grad.gather(-1, arg[:, None]).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mx_activations():
    x = acts(seed=1)
    blocks = x.reshape(-1, 32)
    e = torch.tensor([ref_floor_exp(float(a), 8) for a in blocks.abs().amax(-1)]).unsqueeze(-1)
    s = torch.exp2(e.float())
    want = ((blocks / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).reshape(x.shape)
    assert torch.equal(qdq_act(x, "mx_fp", 8, 32), want)
    # MXFP4 with the rceil rule (MXFP4_RCEIL preset): exponent ceil(log2(amax / 6)), e2m1 elements
    e = [ref_rceil_exp(float(a), 6.0) for a in blocks.abs().amax(-1)]
    want = np.stack([brute_round(b.numpy() / 2.0**k, "e2m1") * 2.0**k for b, k in zip(blocks, e)])
    np.testing.assert_array_equal(qdq_act(x, "mx_fp_rceil", 4, 32).reshape(-1, 32).numpy(), want.astype(np.float32))
    assert qdq_act(x, "mx_int", 8, 32).shape == x.shape
    with pytest.raises(ValueError, match="dynamic"):
        qdq_act(x, "mx_fp", 4, 32, act_max=torch.tensor(1.0))


def test_nvfp4_static_global_scale_by_hand():
    # act_max 0.75 -> g = 448*6/0.75 = 3584. Block 0 max 0.75: s_b = 448, s = 0.125 (like the weight case).
    # Block 1 max 1.5 > act_max: s_b = 3584 * 1.5/6 = 896 -> clamped to 448, s = 0.125, 1.5/0.125 = 12 -> 6
    # -> 0.75: static activations saturate at act_max. Block 2 max 0.25: s_b = 149.3 -> 144 (dynamic per 16).
    x = torch.zeros(1, 48)
    x[0, :3] = torch.tensor([0.75, -0.3, 0.3125])
    x[0, 16:18] = torch.tensor([1.5, -0.2])
    x[0, 32] = 0.25
    y = qdq_act(x, "nv_fp4_with_static_gs", 4, 16, act_max=torch.tensor(0.75))[0]
    assert y[:3].tolist() == [0.75, -0.25, 0.25]
    assert y[16:18].tolist() == [0.75, -0.1875]  # -0.2 / 0.125 = -1.6 -> e2m1 -1.5
    assert y[32].item() == pytest.approx(6 * 144 / 3584, rel=1e-6)
    assert torch.equal(qdq_act(x, "nv_fp", 4, 16, act_max=torch.tensor(0.75)), y.unsqueeze(0))
    # dynamic: the global scale follows x (max 1.5), so block 1 no longer saturates
    assert qdq_act(x, "nv_fp", 4, 16)[0, 16].item() == 1.5


def test_nvfp4_dynamic_matches_compressed_tensors():
    forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp, generate_gparam

    args = PRESET_SCHEMES["NVFP4"]["input_activations"]
    x = acts(seed=2).reshape(6, 64)
    gs = generate_gparam(x.min(), x.max())
    scale, _ = compute_dynamic_scales_and_zp(x, args, None, global_scale=gs)
    assert torch.equal(forward.fake_quantize(x, scale, None, args, global_scale=gs), qdq_act(x, "nv_fp", 4, 16))


@pytest.mark.parametrize("strategy, group_size", [("token", -1), ("group", 128)])
def test_fp8_dynamic_matches_compressed_tensors(strategy, group_size):
    forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    extra = {"group_size": 128} if strategy == "group" else {}
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=True, **extra)
    x = acts((2, 5, 256), seed=3)
    scale, _ = compute_dynamic_scales_and_zp(x, args, None)
    assert torch.equal(forward.fake_quantize(x, scale, None, args), qdq_act(x, "fp", 8, group_size))


def test_shape_dtype_and_errors():
    x = acts().to(torch.bfloat16)
    for dt, bits, g in (("int", 8, -1), ("fp", 8, 128), ("mx_fp", 4, 32), ("nv_fp", 4, 16)):
        y = qdq_act(x, dt, bits, g)
        assert y.shape == x.shape and y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="data_type"):
        qdq_act(x, "nf4", 4, 32)
    with pytest.raises(ValueError):
        qdq_act(x, "fp", 4, 0)
    with pytest.raises(ValueError):
        qdq_act(x, "nv_fp", 8, 16)
