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
    "W4A16 per tensor": replace(get_scheme("W4A16"), group_size=0),  # not sliced: one group
    "MXFP4": get_scheme("MXFP4"),
    "MXFP8": get_scheme("MXFP8"),
    "MXINT4": get_scheme("MXINT4"),
    "NVFP4": get_scheme("NVFP4"),
    "FP8_STATIC": get_scheme("FP8_STATIC"),  # not sliced: per-tensor
    "FP8_BLOCK": get_scheme("FP8_BLOCK"),  # not sliced: 128 x 128 blocks
}


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
    monkeypatch.setattr(rtn_slices, "_joined", lambda parts, layout: joined.append(len(parts)) or real_joined(parts, layout))
    whole = quantize(whole_mods, scheme, 1 << 30, monkeypatch, opt_rtn)
    assert joined == []
    sliced = quantize(sliced_mods, scheme, 450, monkeypatch, opt_rtn)  # 2 rows of 200 (+ padding) a slice
    assert bool(joined) == rtn_slices.sliceable(scheme) and all(n > 1 for n in joined)
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
