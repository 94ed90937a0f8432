"""RTN and opt-RTN of a layer in row slices (`algorithms/rtn_slices.py`) give exactly what one call on the whole
layer gives: the fake-quantized weight written into the module, the codes, scales, zero points and NVFP4
global scales, for Linear and Conv1D layers, fp32 and bf16 weights, padded groups and fused NVFP4 siblings."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import auto_round.algorithms.rtn_slices as rtn_slices
from auto_round.algorithms.opt_rtn import opt_rtn_block
from auto_round.algorithms.signround import rtn_block
from auto_round.schemes import get_scheme

SCHEMES = {
    "W4A16": get_scheme("W4A16"),
    "W2A16G64": get_scheme("W2A16G64"),
    "W3A16G32": get_scheme("W3A16G32"),
    "W4A16 asym": replace(get_scheme("W4A16G32"), sym=False),
    "W8A16 per channel": replace(get_scheme("W8A16"), group_size=-1),
    "W4A16 per tensor": replace(get_scheme("W4A16"), group_size=0),  # one group: its range read first
    "MXFP4": get_scheme("MXFP4"),
    "MXFP8": get_scheme("MXFP8"),
    "MXINT4": get_scheme("MXINT4"),
    "NVFP4": get_scheme("NVFP4"),
    "FP8_STATIC": get_scheme("FP8_STATIC"),  # per-channel scales
    "FP8_BLOCK": get_scheme("FP8_BLOCK"),  # 128 x 128 blocks: these layers are one block row, so one slice
    "FP8 blocks 8x32": replace(get_scheme("FP8_BLOCK"), group_size=(8, 32)),  # ragged: 37 = 4 x 8 + 5, 200 = 6 x 32 + 8
    "FPW8A16": get_scheme("FPW8A16"),  # per-tensor: the same
}
NOT_SLICED = {"FP8_BLOCK"}  # sliceable, but every layer here is one 128-row block row: one slice


def layers(kind: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """q / k (fused siblings: NVFP4 shares their global scale) and o, 200 inputs (padded groups of 64 / 128)."""
    torch.manual_seed(3)
    out = {}
    for name, rows in (("self_attn.q_proj", 37), ("self_attn.k_proj", 11), ("self_attn.o_proj", 23)):
        module = nn.Linear(200, rows, bias=False) if kind == "linear" else Conv1D(rows, 200)
        with torch.no_grad():
            module.weight.normal_().mul_(torch.rand_like(module.weight) * 3)
        out[f"model.layers.0.{name}"] = module.to(dtype)
    return out


def quantize(mods: dict, scheme, slice_elements: int, monkeypatch, opt_rtn: bool):
    monkeypatch.setattr(rtn_slices, "RTN_SLICE_ELEMENTS", slice_elements)
    spec = {n: (m, scheme) for n, m in mods.items()}
    act_max = {n: torch.tensor(2.5) for n in mods}
    if opt_rtn:
        gen = torch.Generator().manual_seed(9)
        imatrix = {n: torch.rand(200, generator=gen) for n in mods}
        return opt_rtn_block(spec, imatrix, act_max=act_max)
    return rtn_block(spec, act_max=act_max)


def fields(result) -> dict:
    names = ("scale", "zero_point", "codes", "global_scale")
    return {k: getattr(result, k) for k in names if getattr(result, k, None) is not None}


@pytest.mark.parametrize("opt_rtn", [False, True])
@pytest.mark.parametrize("kind,dtype", [("linear", torch.float32), ("conv1d", torch.float32), ("linear", torch.bfloat16)])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_sliced_rtn_equals_the_whole_layer(monkeypatch, name, kind, dtype, opt_rtn):
    scheme = SCHEMES[name]
    whole_mods, sliced_mods = layers(kind, dtype), None
    sliced_mods = copy.deepcopy(whole_mods)
    joined = []
    real_joined = rtn_slices._joined
    monkeypatch.setattr(rtn_slices, "_joined",
                        lambda parts, layout, **kw: joined.append(len(parts)) or real_joined(parts, layout, **kw))
    whole = quantize(whole_mods, scheme, 1 << 30, monkeypatch, opt_rtn)
    assert joined == []
    sliced = quantize(sliced_mods, scheme, 450, monkeypatch, opt_rtn)  # 2 rows of 200 (+ padding) a slice
    assert bool(joined) == (name not in NOT_SLICED) and all(n > 1 for n in joined)
    for n in whole_mods:
        assert torch.equal(sliced_mods[n].weight, whole_mods[n].weight), n
        assert not torch.equal(whole_mods[n].weight, layers(kind, dtype)[n].weight)  # it did quantize
        a, b = fields(whole[n]), fields(sliced[n])
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (n, k)
        assert whole[n].layout == sliced[n].layout


def test_weight_absmax_reads_slices():
    module = Conv1D(300, 70)
    with torch.no_grad():
        module.weight.normal_()
        module.weight[5, 250] = -17.0
    assert rtn_slices.weight_absmax(module, slice_elements=100).item() == 17.0


def test_which_schemes_are_sliceable():
    assert all(rtn_slices.sliceable(SCHEMES[n]) for n in SCHEMES)
    assert not rtn_slices.sliceable(get_scheme("gguf:q4_0")) and not rtn_slices.sliceable(get_scheme("BF16"))


def test_weight_range_is_the_whole_weights_widened_to_zero():
    module = nn.Linear(50, 30, bias=False)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.0)  # all positive: the min widens to 0
        module.weight[17, 3] = 4.0
    wmin, wmax = rtn_slices.weight_range(module, slice_elements=60)
    assert wmin.shape == (1, 1) and wmin.item() == 0.0 and wmax.item() == 4.0


def test_block_slices_are_whole_block_rows():
    from auto_round.quant.fp8_qdq import fp8_layout

    layout = fp8_layout(300, 200, (128, 128))  # 3 block rows (the last 44 rows), 2 block columns: 32768 per block row
    assert rtn_slices.row_slices(layout, 40000) == [slice(0, 128), slice(128, 256), slice(256, 384)]
    assert rtn_slices.row_slices(layout, 70000) == [slice(0, 256), slice(256, 512)]
    assert rtn_slices.row_slices(layout, 10) == [slice(0, 128), slice(128, 256), slice(256, 384)]
