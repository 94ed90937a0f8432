"""Integer qdq against an independent, loop-based NumPy implementation of the documented formulas."""

import numpy as np
import pytest
import torch

from auto_round.quant.int_qdq import GroupLayout, qdq_int, quantize_weight_rtn

THRESH16 = np.float16(1e-5)


def ref_group_asym(w: np.ndarray, bits: int):
    maxq = 2**bits - 1
    wmin, wmax = min(w.min(), 0.0), max(w.max(), 0.0)
    s = np.float16(np.float32(wmax - wmin) / np.float32(maxq))
    s = np.float32(max(s, THRESH16))
    zp = min(max(np.round(np.float32(-wmin) / s), 0), maxq)
    q = np.clip(np.round(w / s) + zp, 0, maxq)
    return (s * (q - zp)).astype(np.float32), s, zp, q


def ref_group_sym(w: np.ndarray, bits: int):
    half = 2 ** (bits - 1)
    neg, pos = -min(w.min(), 0.0), max(w.max(), 0.0)
    max_v = (1.0 if pos < neg else -1.0) * max(pos, neg)
    s = np.float16(np.float32(max_v) / np.float32(half))
    s = np.float32(min(s, -THRESH16) if s < 0 else max(s, THRESH16))
    q = np.clip(np.round(w / s), -half, half - 1)
    return (s * q).astype(np.float32), s, np.float32(half), q + half


def ref_qdq(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> np.ndarray:
    """Group the weight by hand (zero-padding the ragged tail) and apply the per-group formula."""
    w = weight.numpy().astype(np.float32)
    out_f, in_f = w.shape
    fn = ref_group_sym if sym else ref_group_asym
    if group_size == 0:
        return fn(w.reshape(-1), bits)[0].reshape(out_f, in_f)
    g = in_f if group_size == -1 or group_size >= in_f else group_size
    result = np.zeros_like(w)
    for o in range(out_f):
        for start in range(0, in_f, g):
            chunk = w[o, start : start + g]
            padded = np.concatenate([chunk, np.zeros(g - len(chunk), np.float32)])
            result[o, start : start + g] = fn(padded, bits)[0][: len(chunk)]
    return result


def edge_tensors(out_f: int, in_f: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(out_f, in_f, generator=gen)
    const = torch.full((out_f, in_f), 0.37)
    const[1::2] = -1.25  # alternate positive/negative constant rows
    mixed = rand.clone()
    mixed[0] = 0.0  # a zero row
    mixed[1] = 3.0  # a constant row
    mixed[2, : in_f // 2] = 1e-7  # tiny values (scale hits the threshold)
    return {"random": rand, "zeros": torch.zeros(out_f, in_f), "constant": const, "mixed": mixed,
            "outlier": rand * torch.where(torch.rand(out_f, in_f, generator=gen) > 0.99, 50.0, 1.0)}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1, 0])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f", [256, 200])  # 200: ragged last group for 32/64/128
def test_qdq_matches_reference_formula(bits, group_size, sym, in_f):
    for kind, w in edge_tensors(6, in_f).items():
        ours, _, _ = quantize_weight_rtn(w, bits, group_size, sym)
        ref = ref_qdq(w, bits, group_size, sym)
        assert np.array_equal(ours.numpy(), ref), f"{kind}: max diff {np.abs(ours.numpy() - ref).max()}"


@pytest.mark.parametrize("sym", [True, False])
def test_zero_rows_stay_zero_and_codes_in_range(sym):
    w = edge_tensors(6, 200)["mixed"]
    for bits in (2, 3, 4, 8):
        wq, res, layout = quantize_weight_rtn(w, bits, 64, sym)
        assert torch.equal(wq[0], torch.zeros(200))
        codes = layout.from_groups(res.q)
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
        # dequantizing the codes with the returned scale / zero point gives the qdq weight exactly
        deq = layout.expand(res.scale) * (codes - layout.expand(res.zero_point))
        assert torch.equal(deq, wq)


def test_hand_computed_sym_4bit():
    # negative extreme dominates: s = +1/8, -1 -> -8 (code 0), 0.5 -> 4 (code 12), 0.3 -> round(2.4) = 2
    w = torch.tensor([[-1.0, 0.5, 0.3, 0.0]])
    wq, res, layout = quantize_weight_rtn(w, 4, -1, True)
    assert res.scale.item() == 0.125
    assert torch.equal(wq, torch.tensor([[-1.0, 0.5, 0.25, 0.0]]))
    assert layout.from_groups(res.q).tolist() == [[0, 12, 10, 8]]
    # positive extreme dominates: the scale turns negative so +1 maps to -8
    wq, res, _ = quantize_weight_rtn(-w, 4, -1, True)
    assert res.scale.item() == -0.125 and torch.equal(wq, -torch.tensor([[-1.0, 0.5, 0.25, 0.0]]))


def test_hand_computed_asym_2bit():
    # range [-1, 2] over 3 steps: s = 1, zp = 1; 0.4 -> 0, 1.6 -> 2
    w = torch.tensor([[-1.0, 2.0, 0.4, 1.6]])
    wq, res, _ = quantize_weight_rtn(w, 2, -1, False)
    assert res.scale.item() == 1.0 and res.zero_point.item() == 1.0
    assert torch.equal(wq, torch.tensor([[-1.0, 2.0, 0.0, 2.0]]))


def test_clip_scales_and_rounding_offset_enter_as_documented():
    w = torch.tensor([[-1.0, 0.5, 0.3, 0.0]])
    layout = GroupLayout(1, 4, -1)
    g = layout.to_groups(w)
    half_clip = torch.full((1, 1), 0.5)
    res = qdq_int(g, 4, True, alpha=half_clip, beta=half_clip)  # range halves -> s = 1/16
    assert res.scale.item() == 0.0625
    v = torch.tensor([[[0.0, 0.0, 0.2, 0.0]]])  # 0.3/0.125 = 2.4, + 0.2 -> 2.6 rounds up to 3
    res = qdq_int(g, 4, True, v=v)
    assert layout.from_groups(res.weight)[0, 2].item() == 0.375


def test_straight_through_gradients_reach_v_alpha_beta():
    w = torch.randn(4, 64)
    layout = GroupLayout(4, 64, 32)
    v = torch.zeros(layout.grouped_shape, requires_grad=True)
    a = torch.ones(4, 2, requires_grad=True)
    b = torch.ones(4, 2, requires_grad=True)
    for sym in (True, False):
        res = qdq_int(layout.to_groups(w), 4, sym, v=v, alpha=a, beta=b)
        res.weight.pow(2).sum().backward()
        assert v.grad is not None and v.grad.abs().sum() > 0
        assert (a.grad.abs().sum() + b.grad.abs().sum()) > 0
        v.grad = a.grad = b.grad = None
