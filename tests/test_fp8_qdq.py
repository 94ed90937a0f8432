"""FP8 weight qdq against `(w / scale).to(float8).float() * scale` with scales computed by hand (loops over
channels / blocks), for per-tensor, per-channel and 128x128 blocks incl. ragged shapes, and against
compressed-tensors' float8 fake quantization."""

import pytest
import torch

from auto_round.quant.fp8_qdq import FP8_MIN_SCALE, BlockLayout, fp8_layout, qdq_fp8, quantize_weight_fp8

SHAPES = [(200, 300), (128, 256), (5, 7), (1, 130)]


def ref_scale(w: torch.Tensor, granularity) -> torch.Tensor:
    """Scale per element [out, in]: amax of its tensor / row / block over 448, by explicit slicing."""
    out_f, in_f = w.shape
    s = torch.empty_like(w)
    if granularity == 0:
        s[:] = w.abs().max() / 448
    elif granularity == -1:
        for r in range(out_f):
            s[r] = w[r].abs().max() / 448
    else:
        bm, bn = granularity
        for r in range(0, out_f, bm):
            for c in range(0, in_f, bn):
                s[r : r + bm, c : c + bn] = w[r : r + bm, c : c + bn].abs().max() / 448
    return s.clamp(min=1 / (448 * 512))


def weights(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * torch.exp2(torch.randint(-6, 6, (shape[0], 1), generator=gen).float())
    if shape[0] > 2:
        w[1] = 0.0  # a zero row
    return w


@pytest.mark.parametrize("shape, granularity", [(s, g) for s in SHAPES for g in (0, -1, (128, 128))]
                         + [((5, 7), (2, 3)), ((9, 20), (4, 8))])
def test_matches_cast_reference(shape, granularity):
    w = weights(shape)
    s = ref_scale(w, granularity)
    want = (w / s).to(torch.float8_e4m3fn).float() * s
    got, res, layout = quantize_weight_fp8(w, granularity)
    assert got.shape == w.shape and torch.equal(got, want)
    assert torch.equal(layout.expand(res.scale), s)
    assert res.q.dtype == torch.float8_e4m3fn
    assert torch.equal(layout.from_groups(res.q.float()) * s, want)  # what a loader computes


def test_scale_shapes_and_block_padding():
    # 200 x 300 with 128 x 128 blocks: ceil -> a [2, 3] scale grid; the ragged blocks are zero-padded
    _, res, layout = quantize_weight_fp8(weights((200, 300)), (128, 128))
    assert res.scale.shape == (2, 3) and layout.grouped_shape == (2, 3, 128 * 128)
    _, res, _ = quantize_weight_fp8(weights((200, 300)), -1)
    assert res.scale.shape == (200, 1)
    _, res, _ = quantize_weight_fp8(weights((200, 300)), 0)
    assert res.scale.shape == (1, 1)


def test_block_layout_roundtrip():
    w = torch.arange(5 * 7, dtype=torch.float32).reshape(5, 7)
    lay = BlockLayout(5, 7, 2, 3)
    g = lay.to_groups(w)
    assert g.shape == (3, 3, 6)
    assert g[0, 0].tolist() == [0, 1, 2, 7, 8, 9]  # row-major inside the block
    assert g[2, 2].tolist() == [34, 0, 0, 0, 0, 0]  # bottom-right ragged block: one value, zero padding
    assert torch.equal(lay.from_groups(g), w)
    assert lay.expand(torch.arange(9.0).reshape(3, 3))[4].tolist() == [6, 6, 6, 7, 7, 7, 8]
    assert isinstance(fp8_layout(5, 7, (2, 3)), BlockLayout) and fp8_layout(5, 7, -1).grouped_shape == (5, 1, 7)
    with pytest.raises(ValueError):
        fp8_layout(5, 7, (0, 3))


def test_zero_rows_and_min_scale():
    got, res, _ = quantize_weight_fp8(torch.zeros(3, 8), -1)
    assert torch.equal(got, torch.zeros(3, 8)) and (res.scale == FP8_MIN_SCALE).all()


def test_e5m2_variant():
    w = weights((16, 40), seed=1)
    s = (w.abs().amax(1, keepdim=True) / 57344).clamp(min=1 / (448 * 512))
    want = (w / s).to(torch.float8_e5m2).float() * s
    res = qdq_fp8(w.unsqueeze(1), fmt="e5m2")
    assert torch.equal(res.weight.squeeze(1), want) and res.q.dtype == torch.float8_e5m2
    with pytest.raises(ValueError):
        qdq_fp8(w.unsqueeze(1), fmt="e3m4")


def test_max_scale_clips_and_v_shifts():
    w = torch.tensor([[[448.0, 100.0, -448.0, 13.0]]])  # scale 1
    # max_scale 0.5 -> scale 0.5: 448 / 0.5 = 896 clamps to 448 -> 224; 100 / 0.5 = 200 -> e4m3 (step 16 in
    # [128, 256)) 12.5 steps ties to 12 -> 192 -> 96; 13 / 0.5 = 26 (step 2 in [16, 32)) is exact
    res = qdq_fp8(w, max_scale=torch.tensor([[0.5]]))
    assert res.weight.tolist() == [[[224.0, 96.0, -224.0, 13.0]]]
    v = torch.tensor([[[0.0, 0.0, 0.0, 0.6]]])  # 13 + 0.6 -> nearest e4m3 (step 1 in [8, 16)) is 14
    assert qdq_fp8(w, v=v).weight[0, 0, 3].item() == 14.0


def test_gradients_reach_v_and_max_scale():
    w = weights((8, 64), seed=2).unsqueeze(1)
    v = torch.zeros_like(w, requires_grad=True)
    ms = torch.ones(8, 1, requires_grad=True)
    res = qdq_fp8(w, v=v, max_scale=ms)
    ((res.weight - w) ** 2 + res.weight).sum().backward()
    assert v.grad.abs().sum() > 0 and ms.grad.abs().sum() > 0
    assert torch.isfinite(v.grad).all() and torch.isfinite(ms.grad).all()


@pytest.mark.parametrize("granularity, strategy", [(0, "tensor"), (-1, "channel"), ((128, 128), "block")])
@pytest.mark.parametrize("shape", [(200, 300), (128, 256)])
def test_matches_compressed_tensors(granularity, strategy, shape):
    """CT's float8 fake quantization with our scales is identical; CT's own scale rule gives the same scales."""
    forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization import QuantizationArgs

    extra = {"block_structure": [128, 128]} if strategy == "block" else {}
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, **extra)
    w = weights(shape, seed=3)
    w[1] = torch.randn(shape[1])  # CT's zero-scale eps differs from our clamp; keep rows nonzero here
    got, res, _ = quantize_weight_fp8(w, granularity)
    scale = res.scale.reshape(1) if granularity == 0 else res.scale
    assert torch.equal(forward.fake_quantize(w, scale, None, args), got)
    if strategy == "channel":
        from compressed_tensors.quantization.utils.helpers import calculate_qparams

        ct_scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
        assert torch.equal(ct_scale, res.scale)
