"""NVFP4 qdq against a hand-worked example, the documented formulas in the reference kernel's fp32 operation
order, and compressed-tensors' NVFP4 fake quant."""

import numpy as np
import pytest
import torch
from fp_reference import brute_round, nvfp4_reference_order

from auto_round.quant.int_qdq import GroupLayout
from auto_round.quant.nvfp_qdq import dequant_nvfp4, global_scale, qdq_nvfp4, shared_global_scale


def hand_weight() -> torch.Tensor:
    """[1, 32]: two blocks of 16. Block 0 max 0.75 (the tensor max), block 1 max 0.25."""
    w = torch.zeros(1, 32)
    w[0, :6] = torch.tensor([0.75, -0.3, 0.05, 0.45, 0.3125, 0.6875])
    w[0, 16:19] = torch.tensor([0.25, -0.1, 0.125])
    return w


def test_global_scale_formula():
    w = torch.tensor([[0.1, -3.0, 2.0]])
    assert global_scale(w).tolist() == [pytest.approx(448 * 6 / 3.0, rel=1e-7)]
    assert global_scale(w).dtype == torch.float32 and global_scale(w).shape == (1,)
    assert global_scale(torch.zeros(2, 16)).tolist() == [1.0]  # nothing to scale
    a, b, c = torch.tensor([[1.0]]), torch.tensor([[-4.0]]), torch.tensor([[2.0]])
    assert shared_global_scale([a, b, c]).tolist() == [448 * 6 / 4.0]  # min over q/k/v = 448*6/max amax
    with pytest.raises(ValueError):
        shared_global_scale([])


def test_hand_computed_example():
    # g = 448*6/0.75 = 3584.
    # block 0: s_b = 3584 * 0.75/6 = 448 (e4m3 exact); s = 448/3584 = 0.125; x/s = 6, -2.4, 0.4, 3.6, 2.5, 5.5
    #          -> e2m1 6, -2, 0.5, 4, 2 (tie to even), 6 -> W^ = 0.75, -0.25, 0.0625, 0.5, 0.25, 0.75
    # block 1: s_b = 3584 * 0.25/6 = 149.33 -> e4m3 (step 16 in [128, 256)) 144; s = 144/3584;
    #          x/s = 6.22 -> 6 (clamp), -2.49 -> -2, 3.11 -> 3
    w = hand_weight()
    layout = GroupLayout(1, 32, 16)
    r = qdq_nvfp4(layout.to_groups(w))
    assert r.global_scale.tolist() == [3584.0]
    assert r.block_scale.tolist() == [[448.0, 144.0]]
    out = layout.from_groups(r.weight)[0]
    assert out[:6].tolist() == [0.75, -0.25, 0.0625, 0.5, 0.25, 0.75]
    s1 = 144 / 3584
    assert out[16:19].tolist() == pytest.approx([6 * s1, -2 * s1, 3 * s1], rel=1e-6)
    assert r.codes[0, 0, :6].tolist() == [7, 12, 1, 6, 4, 7]
    assert r.codes[0, 1, :3].tolist() == [7, 12, 5]
    assert (out[6:16] == 0).all() and (out[19:] == 0).all()


def test_max_scale_and_init_scale():
    w = GroupLayout(1, 32, 16).to_groups(hand_weight())
    # block 1 with max_scale 0.9: 3584 * 0.225/6 = 134.4 -> e4m3 128; s = 1/28; 0.25*28 = 7 -> 6 -> 6/28
    r = qdq_nvfp4(w, max_scale=torch.tensor([[1.0, 0.9]]))
    assert r.block_scale.tolist() == [[448.0, 128.0]]
    assert r.weight[0, 1, 0].item() == pytest.approx(6 / 28, rel=1e-6)
    # init_scale 1.5 on block 0 would give 672 > 448: the block scale is clamped to the e4m3 max
    r = qdq_nvfp4(w, init_scale=torch.tensor([[1.5, 1.0]]))
    assert r.block_scale.tolist() == [[448.0, 144.0]]


def test_block_scales_are_e4m3_and_dequant_roundtrip():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 128, generator=gen) * torch.exp2(torch.randint(-8, 4, (24, 1), generator=gen).float())
    layout = GroupLayout(24, 128, 16)
    r = qdq_nvfp4(layout.to_groups(w))
    s = r.block_scale
    assert torch.equal(s.to(torch.float8_e4m3fn).float(), s) and (s <= 448).all() and (s >= 0).all()
    assert r.global_scale.item() == pytest.approx(448 * 6 / w.abs().max().item(), rel=1e-7)
    assert torch.equal(dequant_nvfp4(r.codes, r.block_scale, r.global_scale), r.weight)
    # every element is a block scale times an e2m1 value
    assert ((r.weight / (s / r.global_scale).unsqueeze(-1)).abs().unsqueeze(-1)
            - torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6])).abs().amin(-1).max() < 1e-5


def test_shared_global_scale_is_used():
    w = GroupLayout(1, 32, 16).to_groups(hand_weight())
    g = torch.tensor([3584.0 / 2])  # as if a fused sibling had twice the amax
    r = qdq_nvfp4(w, gscale=g)
    assert r.global_scale.tolist() == [1792.0] and r.block_scale[0, 0].item() == 224.0  # 1792 * 0.75/6


def test_underflowing_block_scale_gives_zero_not_nan():
    w = torch.zeros(1, 2, 16)
    w[0, 0, 0] = 1.0
    w[0, 1, :3] = torch.tensor([1e-6, -5e-7, 2e-7])  # s_b = 2688 * 1e-6/6 = 4.5e-4 < 2^-10 -> e4m3 0
    r = qdq_nvfp4(w)
    assert r.block_scale[0, 1].item() == 0.0
    assert torch.isfinite(r.weight).all() and (r.weight[0, 1] == 0).all()
    assert torch.equal(qdq_nvfp4(torch.zeros(2, 1, 16)).weight, torch.zeros(2, 1, 16))
    assert r.codes[0, 1].tolist() == [0] * 16  # -5e-7 / inf = -0 still encodes as +0
    v = torch.zeros_like(w, requires_grad=True)  # the tuning path: finite gradients, none into the dead block
    x = w.clone().requires_grad_(True)
    qdq_nvfp4(x, v=v).weight.sum().backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(x.grad).all()
    assert (x.grad[0, 1] == 0).all() and (v.grad[0, 1] == 0).all()


def test_gradients_reach_v_and_max_scale():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 16, generator=gen)
    v = torch.zeros_like(w, requires_grad=True)
    ms = torch.ones(4, 3, requires_grad=True)
    r = qdq_nvfp4(w, v=v, max_scale=ms)
    ((r.weight - w) ** 2).sum().backward()
    assert v.grad.abs().sum() > 0 and ms.grad.abs().sum() > 0
    assert torch.isfinite(v.grad).all() and torch.isfinite(ms.grad).all()


def test_v_moves_a_tie():
    w = GroupLayout(1, 32, 16).to_groups(hand_weight())
    v = torch.zeros_like(w)
    v[0, 0, 4] = 0.01  # x/s = 2.5 ties to 2; 2.51 rounds to 3
    assert qdq_nvfp4(w, v=v).weight[0, 0, 4].item() == 3 * 0.125


def test_requires_groups_of_16():
    with pytest.raises(ValueError, match="16"):
        qdq_nvfp4(torch.zeros(1, 1, 32))


def test_matches_compressed_tensors_nvfp4():
    """CT's NVFP4 (tensor_group, e4m3 scales, global scale) gives the same global scale, block scales and
    dequantized weights, bit for bit, on data without exact ties (random fp32 weights): CT divides exactly
    where ours multiplies by reciprocals in the reference's order, which only matters at a tie (see
    test_matches_the_reference_operation_order_on_ties), and both dequantize as x_q * (s_b / g)."""
    forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = PRESET_SCHEMES["NVFP4"]["weights"]
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=gen) * 0.05
    w[3, 16:32] = 0.0  # a zero block
    layout = GroupLayout(32, 64, 16)
    grouped = layout.to_groups(w)
    r = qdq_nvfp4(grouped)
    gs = generate_gparam(w.min(), w.max())
    assert torch.equal(gs, r.global_scale)
    amax = grouped.abs().amax(-1)
    ct_scale, _ = calculate_qparams(-amax, amax, args, global_scale=gs)
    nonzero = amax > 0  # CT replaces a zero block scale by 0.125 (its eps); ours stays 0 (W^ is 0 either way)
    assert torch.equal(ct_scale.float()[nonzero], r.block_scale[nonzero])
    ref = forward.fake_quantize(w, ct_scale, None, args, global_scale=gs)
    assert torch.equal(ref, layout.from_groups(r.weight))


def test_block_scale_tie_rounds_up_like_the_reference():
    # tensor max 2.40625 -> g = 2688 * fl(1 / 2.40625) = 1117.0909. A block max of 0.365234375 (both values
    # from SmolLM2's layer 7 up_proj) gives 448 * 0.365234375 / 2.40625 = 68 exactly, the midpoint of the
    # e4m3 neighbours 64 and 72: exact arithmetic rounds it to the even 64; the reference's fp32 order
    # (g * (amax * fl(1/6))) lands above 68, so 72. Ours follows the reference.
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 16] = 2.40625, 0.365234375
    r = qdq_nvfp4(GroupLayout(1, 32, 16).to_groups(w))
    assert r.block_scale.tolist() == [[448.0, 72.0]]
    assert 448 * 0.365234375 / 2.40625 == 68.0  # the tie, in double precision
    # the block max maps to 0.365234375 * g / 72 = 5.67 -> 6 (not clipped as it would be with 64: 6.38 -> 6)
    assert r.elements[0, 1, 0].item() == 6.0


def test_matches_the_reference_operation_order_on_ties():
    """Weights on a coarse grid (like bf16 ones) make exact fp32 ties common; codes and block scales equal
    the reference kernel's order bit for bit, while compressed-tensors' order (exact division) decides some
    of them differently."""
    gen = torch.Generator().manual_seed(0)
    w = torch.round(torch.randn(96, 64, generator=gen) * 60) / 1024
    w[0, 0] = 2.40625  # the tensor max of the example above: g = 1117.0909
    layout = GroupLayout(96, 64, 16)
    grouped = layout.to_groups(w)
    r = qdq_nvfp4(grouped)
    ref_q, ref_sb, ref_g = nvfp4_reference_order(grouped.numpy())
    assert r.global_scale.item() == float(ref_g)
    assert np.array_equal(r.block_scale.numpy(), ref_sb)
    assert np.array_equal(r.elements.numpy(), ref_q)
    # the data do contain ties that the order decides: exact division picks other block scales and codes
    g = r.global_scale
    sb_exact = (g * (grouped.abs().amax(-1) / 6)).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    y_exact = (grouped / (sb_exact / g).unsqueeze(-1)).clamp(-6, 6)
    assert (sb_exact.numpy() != ref_sb).sum() > 0
    assert (brute_round(y_exact.numpy(), "e2m1") != ref_q).sum() > 0
    # and W^ is what the loader rebuilds from the codes and scales
    assert torch.equal(r.weight, dequant_nvfp4(r.codes, r.block_scale, r.global_scale))
