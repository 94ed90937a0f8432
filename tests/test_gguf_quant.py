"""ggml quantization math: bit-exact against gguf-py's dequantizer, llama.cpp-equivalent quality.

The golden test: search -> qdq -> pack_gguf -> gguf.quants.dequantize must reproduce our W^ bit for bit;
mismatching blocks are counted and reported. Quality is compared with gguf-py's own quantizers (legacy
types) and with error levels measured once with llama.cpp's ggml_quantize_chunk (all types).
"""

import numpy as np
import pytest
import torch

from auto_round.packing.gguf import gguf_quant_type, pack_gguf
from auto_round.quant.gguf import GGML_TYPES, build_params, ggml_type, qdq, quantize, search_params

gguf = pytest.importorskip("gguf")

TYPES = list(GGML_TYPES)
LEGACY = [n for n, t in GGML_TYPES.items() if not t.kquant]


pytestmark = pytest.mark.usefixtures("one_thread")


def special_weight(shape, seed):
    """Gaussian weight whose first rows are the hard cases: all zero, one huge outlier, negative-dominated,
    tiny values; row 4 (when present) has an all-zero and an all-negative sub-block."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    rows = [
        torch.zeros(shape[1]),
        w[1].clone().index_fill_(0, torch.tensor([shape[1] // 3]), 50.0),
        -(torch.randn(shape[1], generator=gen) * 0.02).abs() + 0.001,
        torch.randn(shape[1], generator=gen) * 1e-6,
    ]
    for i, r in enumerate(rows[: shape[0]]):
        w[i] = r
    if shape[0] > 4:
        w[4, :32] = 0.0
        w[4, 32:64] = -w[4, 32:64].abs()
    return w


def random_imatrix(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) ** 2 + 0.01


def gguf_decode(codes, params):
    data = pack_gguf(codes, params)
    return gguf.quants.dequantize(data, gguf_quant_type(params.qtype))


def bad_blocks(ours: torch.Tensor, theirs: np.ndarray, block: int) -> int:
    """Blocks whose float32 bit patterns differ anywhere (so -0.0 vs 0.0 counts too)."""
    a = ours.detach().numpy().view(np.int32)
    b = np.ascontiguousarray(theirs, dtype=np.float32).view(np.int32)
    return int((a != b).reshape(a.shape[0], -1, block).any(-1).sum())


def assert_valid_params(params, codes, shape):
    t = ggml_type(params.qtype)
    out_f, in_f = shape
    lo, hi = t.qmin + t.zero, t.qmax + t.zero
    assert codes.dtype == torch.int32 and codes.shape == shape
    assert int(codes.min()) >= lo and int(codes.max()) <= hi, (t.name, int(codes.min()), int(codes.max()))
    assert params.d.shape == (out_f, in_f // t.block)
    for f in (params.d, params.dmin):
        if f is not None:
            assert f.dtype == torch.float32 and torch.equal(f.half().float(), f), t.name
    assert params.scale.shape == (out_f, in_f // t.sub)
    if t.kquant:
        sc_lo, sc_hi = t.sc_range
        assert sc_lo <= int(params.sc.min()) and int(params.sc.max()) <= sc_hi
        assert torch.equal(params.scale, params.d.repeat_interleave(t.subs_per_block, 1) * params.sc.float())
        if not t.sym:
            assert 0 <= int(params.m.min()) and int(params.m.max()) <= sc_hi
    assert (params.offset is None) == t.sym
    assert torch.isfinite(params.scale).all()


@pytest.mark.parametrize("shape", [(8, 256), (3, 512), (64, 768)])
@pytest.mark.parametrize("mode", ["rtn", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES)
def test_qdq_equals_gguf_dequantize(qtype, mode, shape):
    w = special_weight(shape, seed=shape[0])
    imatrix = random_imatrix(shape[1], seed=7) if mode == "imatrix" else None
    gen = torch.Generator().manual_seed(3)
    for v in (None, torch.rand(shape, generator=gen) - 0.5):
        params = search_params(w, qtype, imatrix, v)
        w_hat, codes = qdq(w, params, v)
        assert_valid_params(params, codes, shape)
        assert torch.isfinite(w_hat).all()
        n_bad = bad_blocks(w_hat, gguf_decode(codes, params), ggml_type(qtype).block)
        assert n_bad == 0, f"{qtype} {mode} v={v is not None} {shape}: {n_bad} blocks differ from gguf-py"


@pytest.mark.parametrize("qtype", TYPES)
def test_special_rows_behave(qtype):
    t = ggml_type(qtype)
    w = special_weight((8, 256), seed=0)
    w_hat, codes, params = quantize(w, qtype)
    assert torch.equal(w_hat[0], torch.zeros(256))  # zero row stays exactly zero (no NaN from d = 0)
    assert torch.equal(params.d[0], torch.zeros_like(params.d[0]))
    if t.sym:
        assert torch.all(codes[0] == t.zero)
    outlier = int(w[1].abs().argmax())
    assert abs(float(w_hat[1, outlier]) - 50.0) < 50.0 * 0.07  # the outlier survives (fp16 d, 2-bit grid)
    assert float(w_hat[3].abs().max()) <= 2 * float(w[3].abs().max())  # tiny values: no blow-up
    assert torch.equal(quantize(w, qtype)[0], w_hat)  # deterministic


@pytest.mark.parametrize("qtype", TYPES)
def test_qdq_is_idempotent(qtype):
    w = special_weight((16, 512), seed=1)
    w_hat, codes, params = quantize(w, qtype, random_imatrix(512, seed=2))
    w_hat2, codes2 = qdq(w_hat, params)
    assert torch.equal(w_hat2, w_hat) and torch.equal(codes2, codes)


@pytest.mark.parametrize("qtype", ["q4_0", "q5_1", "q2_k", "q3_k", "q4_k", "q6_k"])
def test_v_rounds_through_a_straight_through_estimator(qtype):
    w = special_weight((8, 512), seed=5)
    params = search_params(w, qtype)
    v = torch.zeros_like(w, requires_grad=True)
    w_hat, codes = qdq(w, params, v)
    assert torch.equal(w_hat.detach(), qdq(w, params)[0])  # v = 0 is plain rounding
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(w.shape, generator=gen)
    (w_hat * target).sum().backward()
    g = v.grad
    assert torch.isfinite(g).all()
    assert torch.equal(g[0], torch.zeros(512))  # zero row: scale 0, no gradient
    assert float(g[5:].abs().sum()) > 0
    # where q is not clamped, dW^/dv = scale
    scale = params.scale.repeat_interleave(ggml_type(qtype).sub, 1)
    t = ggml_type(qtype)
    inside = (codes > t.qmin + t.zero) & (codes < t.qmax + t.zero)
    assert torch.allclose(g[inside], (scale * target)[inside])
    # v moves codes: +0.49 rounds most values up
    up = qdq(w, params, torch.full_like(w, 0.49))[1]
    assert int((up != codes).sum()) > w.numel() // 4


@pytest.mark.parametrize("qtype", ["q4_1", "q5_0", "q2_k", "q3_k", "q4_k", "q6_k"])
def test_search_uses_v(qtype):
    w = special_weight((8, 512), seed=9)
    imatrix = random_imatrix(512, 1)
    for im in (None, imatrix):
        plain = search_params(w, qtype, im)
        assert torch.equal(search_params(w, qtype, im, torch.zeros_like(w)).scale, plain.scale)  # v = 0: same
        if im is None and not ggml_type(qtype).kquant:
            continue  # legacy types without an imatrix have no search: max/min rules only
        shifted = search_params(w, qtype, im, torch.full_like(w, 0.45))
        assert not torch.equal(shifted.scale, plain.scale), f"{qtype} imatrix={im is not None}"


# ---- quality -------------------------------------------------------------------------------------


def quality_data():
    """Gaussian weights with a few outliers and an imatrix with a wide spread (numpy: stable across versions)."""
    rng = np.random.default_rng(1234)
    w = rng.standard_normal((64, 1024)).astype(np.float32) * 0.02
    idx = rng.choice(w.size, 64, replace=False)
    w.flat[idx] *= 12.0
    imatrix = (rng.standard_normal(1024) ** 2 + 0.05).astype(np.float32)
    return w, imatrix


def weighted_mse(w_hat, w, weights):
    return float((((np.asarray(w_hat, dtype=np.float64) - w) ** 2) * weights).mean())


# imatrix-weighted MSE of llama.cpp's own quantizer on quality_data(), measured with ggml_quantize_chunk
# of libggml-base 0.25.3 (llama-cpp-python 0.3.36) and decoded with gguf-py; "rtn" = no imatrix given.
LLAMA_CPP_ERROR = {
    ("q4_0", "rtn"): 5.313919e-06,
    ("q4_0", "imatrix"): 4.552254e-06,
    ("q4_1", "rtn"): 3.466924e-06,
    ("q4_1", "imatrix"): 2.280396e-06,
    ("q5_0", "rtn"): 1.384578e-06,
    ("q5_0", "imatrix"): 1.200153e-06,
    ("q5_1", "rtn"): 8.289340e-07,
    ("q5_1", "imatrix"): 5.430730e-07,
    ("q8_0", "rtn"): 2.183342e-08,
    ("q8_0", "imatrix"): 2.183342e-08,
    ("q2_k", "rtn"): 4.536063e-05,
    ("q2_k", "imatrix"): 2.835795e-05,
    ("q3_k", "rtn"): 1.355557e-05,
    ("q3_k", "imatrix"): 1.087617e-05,
    ("q4_k", "rtn"): 2.962959e-06,
    ("q4_k", "imatrix"): 2.417840e-06,
    ("q5_k", "rtn"): 7.544315e-07,
    ("q5_k", "imatrix"): 6.364895e-07,
    ("q6_k", "rtn"): 2.144569e-07,
    ("q6_k", "imatrix"): 1.844705e-07,
}


@pytest.fixture(scope="module")
def quality():
    w, imatrix = quality_data()
    wt, it = torch.from_numpy(w), torch.from_numpy(imatrix)
    errors = {}
    for name in TYPES:
        for mode in ("rtn", "imatrix"):
            w_hat = quantize(wt, name, it if mode == "imatrix" else None)[0]
            errors[(name, mode)] = (weighted_mse(w_hat, w, imatrix), weighted_mse(w_hat, w, 1.0))
    return w, imatrix, errors


@pytest.mark.parametrize("mode", ["rtn", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES)
def test_error_matches_llama_cpp(quality, qtype, mode):
    ours = quality[2][(qtype, mode)][0]
    ref = LLAMA_CPP_ERROR[(qtype, mode)]
    assert ours <= 1.01 * ref, f"{qtype} {mode}: weighted MSE {ours:.4e} vs llama.cpp {ref:.4e} ({ours / ref:.4f}x)"


@pytest.mark.parametrize("qtype", LEGACY)
def test_error_matches_gguf_py_quantizer(quality, qtype):
    w = quality[0]
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w, gguf_quant_type(qtype)), gguf_quant_type(qtype))
    ref = weighted_mse(theirs, w, 1.0)
    ours = quality[2][(qtype, "rtn")][1]
    assert ours <= 1.01 * ref, f"{qtype}: MSE {ours:.4e} vs gguf-py {ref:.4e} ({ours / ref:.4f}x)"


@pytest.mark.parametrize("qtype", [n for n in TYPES if n != "q8_0"])
def test_imatrix_lowers_weighted_error(quality, qtype):
    errors = quality[2]
    with_im, without = errors[(qtype, "imatrix")][0], errors[(qtype, "rtn")][0]
    assert with_im < 0.98 * without, f"{qtype}: imatrix-weighted MSE {with_im:.4e} (imatrix) vs {without:.4e} (none)"


def test_error_falls_with_bits(quality):
    errors = quality[2]
    chain = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"]
    mse = [errors[(n, "rtn")][1] for n in chain]
    assert all(a > b for a, b in zip(mse, mse[1:])), dict(zip(chain, mse))
    assert errors[("q4_1", "rtn")][1] < errors[("q4_0", "rtn")][1]
    assert errors[("q5_1", "rtn")][1] < errors[("q5_0", "rtn")][1]


# ---- types and errors ----------------------------------------------------------------------------


def test_type_table():
    expected = {  # bits, block, sub, sym, super_bits (reference doc 3.6)
        "q4_0": (4, 32, 32, True, None), "q4_1": (4, 32, 32, False, None), "q5_0": (5, 32, 32, True, None),
        "q5_1": (5, 32, 32, False, None), "q8_0": (8, 32, 32, True, None), "q2_k": (2, 256, 16, False, 4),
        "q3_k": (3, 256, 16, True, 6), "q4_k": (4, 256, 32, False, 6), "q5_k": (5, 256, 32, False, 6),
        "q6_k": (6, 256, 16, True, 8),
    }  # fmt: skip
    assert set(GGML_TYPES) == set(expected)
    for name, (bits, block, sub, sym, sb) in expected.items():
        t = ggml_type(name.upper())
        assert (t.bits, t.block, t.sub, t.sym, t.super_bits, t.kquant) == (bits, block, sub, sym, sb, block == 256)
        assert gguf.GGML_QUANT_SIZES[gguf_quant_type(name)][0] == block
    with pytest.raises(ValueError, match="q4_k"):
        ggml_type("q4_km")


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k"])
def test_bad_shapes_raise(qtype):
    t = ggml_type(qtype)
    for shape in [(4, t.block + 16), (t.block,), (2, 2, t.block)]:
        with pytest.raises(ValueError, match=rf"{qtype}.*{shape[-1]}"):
            search_params(torch.zeros(shape), qtype)
    w = torch.randn(4, 512)
    with pytest.raises(ValueError, match="imatrix"):
        search_params(w, qtype, imatrix=torch.ones(256))
    with pytest.raises(ValueError, match="imatrix"):
        search_params(w, qtype, imatrix=-torch.ones(512))
    with pytest.raises(ValueError, match="v must"):
        search_params(w, qtype, v=torch.zeros(4, 256))
    params = search_params(w, qtype)
    with pytest.raises(ValueError, match="params.scale"):
        qdq(torch.randn(8, 512), params)
    with pytest.raises(ValueError, match="inf or NaN"):
        search_params(torch.full((4, 512), float("nan")), qtype)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q2_k", "q3_k", "q4_k", "q6_k"])
def test_row_chunked_search_is_identical(qtype, monkeypatch):
    import auto_round.quant.gguf.api as api

    w = special_weight((12, 512), seed=6)
    imatrix, v = random_imatrix(512, 2), torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) - 0.5
    whole = search_params(w, qtype, imatrix, v)
    monkeypatch.setattr(api, "_CHUNK_ELEMENTS", 5 * 512)  # chunks of 5, 5, 2 rows
    chunked = search_params(w, qtype, imatrix, v)
    for field in ("scale", "offset", "d", "dmin", "sc", "m"):
        a, b = getattr(whole, field), getattr(chunked, field)
        assert (a is None and b is None) or torch.equal(a, b), field


def test_build_params_matches_search():
    w = special_weight((8, 512), seed=4)
    for name in TYPES:
        p = search_params(w, name)
        q = build_params(name, p.d, p.dmin, p.sc, p.m)
        assert torch.equal(q.scale, p.scale)
        assert (q.offset is None and p.offset is None) or torch.equal(q.offset, p.offset)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("qtype", TYPES)
def test_cuda_matches_gguf_dequantize(qtype):
    w = special_weight((64, 768), seed=11)
    imatrix, v = random_imatrix(768, 3), torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) - 0.5
    for im in (None, imatrix):
        params = search_params(w.cuda(), qtype, None if im is None else im.cuda(), v.cuda())
        w_hat, codes = qdq(w.cuda(), params, v.cuda())
        assert w_hat.device.type == "cuda"
        cpu = type(params)(**{k: (x.cpu() if torch.is_tensor(x) else x) for k, x in vars(params).items()})
        n_bad = bad_blocks(w_hat.cpu(), gguf_decode(codes.cpu(), cpu), ggml_type(qtype).block)
        assert n_bad == 0, f"{qtype} cuda imatrix={im is not None}: {n_bad} blocks differ"
