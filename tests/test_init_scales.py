"""The per-layer opt-RTN searches (`algorithms/init_scales.py`) walk a layer in row slices to bound their
memory: any slicing gives the result of searching the whole weight at once with the `quant/` searches."""

from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import auto_round.algorithms.init_scales as init_scales
from auto_round.algorithms.float_tunable import float_layout
from auto_round.algorithms.init_scales import float_init_scale, int_clip_factor
from auto_round.layers import layer_weight
from auto_round.quant.fp_opt_rtn import importance_to_groups, search_mx_scale, search_nvfp4_scale
from auto_round.quant.int_qdq import GroupLayout, group_range
from auto_round.quant.mx_qdq import get_mx_format
from auto_round.quant.nvfp_qdq import global_scale
from auto_round.quant.opt_rtn import fill_importance, search_sym_clip_factor
from auto_round.schemes import get_scheme


def scheme_named(name: str):
    """A preset, or "W4A16T": W4A16 with one scale for the whole tensor (group_size 0)."""
    return replace(get_scheme("W4A16"), group_size=0) if name == "W4A16T" else get_scheme(name)


def whole_weight_search(module: nn.Module, name: str, imatrix: torch.Tensor, gscale=None) -> torch.Tensor:
    """The unsliced reference: the whole weight grouped and searched in one call."""
    scheme = scheme_named(name)
    weight = layer_weight(module).detach().float()
    if scheme.data_type == "int":
        layout = GroupLayout(weight.shape[0], weight.shape[1], scheme.group_size)
        grouped = layout.to_groups(weight)
        importance = fill_importance(layout.to_groups(imatrix.expand_as(weight)), grouped, scheme.bits)
        return search_sym_clip_factor(grouped, scheme.bits, importance, *group_range(grouped))
    layout = float_layout(scheme, *weight.shape)
    grouped = layout.to_groups(weight)
    importance = fill_importance(importance_to_groups(imatrix, layout), grouped, scheme.bits)
    if scheme.data_type == "nv_fp":
        return search_nvfp4_scale(grouped, importance, gscale=global_scale(weight) if gscale is None else gscale)
    return search_mx_scale(grouped, get_mx_format(scheme.data_type, scheme.bits), importance)


def layer(kind: str) -> nn.Module:
    torch.manual_seed(11)
    module = nn.Linear(200, 37, bias=False) if kind == "linear" else Conv1D(37, 200)  # Conv1D: weight [in, out]
    with torch.no_grad():
        module.weight.normal_().mul_(torch.rand_like(module.weight[:, :1]) * 3)
        module.weight.view(-1)[123] = 9.0  # one outlier: the NVFP4 global scale comes from one slice only
    return module


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("name", ["W2A16G64", "W3A16G64", "W4A16", "W4A16G32", "W4A16T", "MXFP4", "MXFP8", "NVFP4"])
@pytest.mark.parametrize("slice_elements", [1, 450, 1 << 30])  # one row, 2 rows (a short last slice), all
def test_sliced_layer_search_equals_the_whole_weight_search(monkeypatch, kind, name, slice_elements):
    module = layer(kind)
    imatrix = torch.rand(200) ** 3
    imatrix[::9] = 0  # zero entries: fill_importance's per-group and per-row fallbacks
    imatrix[:64] = 0
    monkeypatch.setattr(init_scales, "INT_SLICE_ELEMENTS", slice_elements)
    monkeypatch.setattr(init_scales, "FLOAT_SLICE_ELEMENTS", slice_elements)
    scheme = scheme_named(name)
    if scheme.data_type == "int":
        got = int_clip_factor(module, scheme, imatrix)
    else:
        got = float_init_scale(module, scheme, imatrix)
    expected = whole_weight_search(module, name, imatrix)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    if got.numel() > 1:
        assert (got != got.flatten()[0]).any()  # the search did choose: not one constant everywhere


def test_sliced_nvfp4_search_keeps_a_given_global_scale(monkeypatch):
    module = layer("linear")
    imatrix = torch.rand(200)
    monkeypatch.setattr(init_scales, "FLOAT_SLICE_ELEMENTS", 450)
    gscale = torch.tensor([300.0])
    got = float_init_scale(module, get_scheme("NVFP4"), imatrix, gscale=gscale)
    assert torch.equal(got, whole_weight_search(module, "NVFP4", imatrix, gscale=gscale))
    assert not torch.equal(got, whole_weight_search(module, "NVFP4", imatrix))
