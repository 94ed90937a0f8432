"""The recomputing qdq node of the tuning step (quant/int_qdq_fused.py) against the plain autograd graph of
qdq_int_sym / qdq_int_asym: the same fake-quantized weight and the same gradients for V, alpha and beta,
bit for bit, on data that exercises clamping at both ends, exact .5 ties and ragged groups."""

import pytest
import torch

from auto_round.quant.int_qdq import GroupLayout, asym_scale_zp, group_range, qdq_int, sym_scale_of_range
from auto_round.quant.int_qdq_fused import int_qdq_tuning


def _case(seed: int, out: int = 24, inp: int = 80, group: int = 32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen)
    w[0, :8] = torch.tensor([0.5, -0.5, 1.5, 2.5, -3.5, 7.0, -8.0, 0.0])  # ties and extremes
    layout = GroupLayout(out, inp, group)
    grouped = layout.to_groups(w)
    wmin, wmax = group_range(grouped)
    # V over its whole range (the signed steps keep it in [-0.5, 0.5]) and clip scales below and at 1
    v = ((torch.rand(grouped.shape, generator=gen) - 0.5)).requires_grad_(True)
    alpha = (0.6 + 0.4 * torch.rand(wmin.shape, generator=gen)).requires_grad_(True)
    beta = (0.6 + 0.4 * torch.rand(wmin.shape, generator=gen)).requires_grad_(True)
    alpha.data[0, 0] = 1.0
    upstream = torch.randn(grouped.shape, generator=gen)
    return grouped, wmin, wmax, v, alpha, beta, upstream


def _grads(weight, upstream, params):
    (weight * upstream).sum().backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_same_weight_and_gradients_as_the_plain_graph(bits, sym, scale_dtype, seed):
    grouped, wmin, wmax, v, alpha, beta, upstream = _case(seed)
    params = [v, alpha, beta]
    plain = qdq_int(grouped, bits, sym, v=v, alpha=alpha, beta=beta, wmin=wmin, wmax=wmax, scale_dtype=scale_dtype)
    plain_grads = _grads(plain.weight, upstream, params)
    if sym:
        scale, zp = sym_scale_of_range(wmin, wmax, alpha, beta, bits, scale_dtype, grouped.dtype), None
    else:
        scale, zp = asym_scale_zp(wmin, wmax, alpha, beta, bits, scale_dtype, grouped.dtype)
    fused = int_qdq_tuning(grouped, v, scale, bits, sym, zp)
    assert torch.equal(fused, plain.weight)
    fused_grads = _grads(fused, upstream, params)
    clamped = (plain.q == 0) | (plain.q == 2**bits - 1)
    assert clamped.any() and (~clamped).any()  # both sides of the clamp are exercised
    for name, a, b in zip(("V", "alpha", "beta"), fused_grads, plain_grads):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max().item()}"
    assert fused_grads[0].abs().sum() > 0 and fused_grads[1].abs().sum() > 0


@pytest.mark.parametrize("bits, code_bytes", [(4, 1), (8, 2)])
def test_keeps_only_narrow_integer_codes_for_backward(bits, code_bytes):
    grouped, wmin, wmax, v, alpha, beta, _ = _case(3)
    scale = sym_scale_of_range(wmin, wmax, alpha, beta, bits, torch.float16, grouped.dtype)

    def saved_bytes(fn) -> int:
        new = {}

        def pack(t):
            if t.shape == grouped.shape and t.data_ptr() not in (grouped.data_ptr(), v.data_ptr()):
                new[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(new.values())

    fused = saved_bytes(lambda: int_qdq_tuning(grouped, v, scale, bits, True))
    plain = saved_bytes(lambda: qdq_int(grouped, bits, True, v=v, alpha=alpha, beta=beta, wmin=wmin, wmax=wmax))
    assert fused == grouped.numel() * code_bytes  # one int8 (int16 at 8 bits) code per weight
    assert plain >= grouped.numel() * 8  # the plain graph: the clamp's input and the codes in fp32


def test_asym_needs_the_zero_point():
    grouped, wmin, wmax, v, alpha, beta, _ = _case(4)
    scale, _ = asym_scale_zp(wmin, wmax, alpha, beta, 4, torch.float16, grouped.dtype)
    with pytest.raises(ValueError, match="zero point"):
        int_qdq_tuning(grouped, v, scale, 4, False)
