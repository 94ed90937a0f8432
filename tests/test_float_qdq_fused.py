"""The MX / NVFP4 / FP8 element stage as one autograd node (quant/float_qdq_fused.py, used by
FloatTunableLayer.qdq_weight): the same fake-quantized weight and bit-identical gradients of V and max_scale as
the plain autograd graph of qdq_mx / qdq_nvfp4 / qdq_fp8, with fewer bytes kept for the backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from auto_round.algorithms.float_tunable import FloatTunableLayer
from auto_round.quant.fp_formats import E2M1, E2M3, E3M2, E4M3, E5M2, representable_values
from auto_round.quant.mx_qdq import MX_FORMATS
from auto_round.schemes import QuantScheme, get_scheme
from autograd_probe import saved_bytes

SCHEMES = {
    "MXFP4": get_scheme("MXFP4"), "MXFP6": get_scheme("MXFP6"), "MXFP8": get_scheme("MXFP8"),
    "MXINT4": get_scheme("MXINT4"), "MXINT8": QuantScheme(bits=8, group_size=32, data_type="mx_int"),
    "NVFP4": get_scheme("NVFP4"),
    "FP8_STATIC": get_scheme("FP8_STATIC"),  # per channel
    "FP8_BLOCK": get_scheme("FP8_BLOCK"),  # 128 x 128 blocks: one ragged block row here (24 rows)
    "FPW8A16": get_scheme("FPW8A16"),  # per tensor
}


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """Rows of very different ranges, an all-zero block, a row of tiny (subnormal-scale) values, exact ties."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * (torch.rand(out_features, 1, generator=gen) * 4)
    w[0, :32] = 0.0
    w[1] *= 1e-30
    w[2, :16] = torch.tensor([6.0, 5.0, 2.5, 0.25, 0.75, 1.25, 3.5, -5.0, -2.5, 4.0, 1.0, 0.5, 0.0, -0.25, 3.0, -6.0])
    return w


def _tunable(name: str, seed: int, init_scale: bool) -> FloatTunableLayer:
    lin = nn.Linear(128, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_weight(24, 128, seed))
    scheme = SCHEMES[name]
    shape = FloatTunableLayer(lin, scheme).max_scale.shape
    gen = torch.Generator().manual_seed(seed + 100)
    init = 0.5 + torch.rand(shape, generator=gen) if init_scale else None
    tunable = FloatTunableLayer(lin, scheme, init_scale=init, scale_bound=2.0)
    with torch.no_grad():  # as after some steps: V within +-0.5 (some elements pushed past the clamp), clips < 1
        tunable.v.copy_((torch.rand(tunable.v.shape, generator=gen) - 0.5) * 0.98)
        over = 1000.0 if scheme.data_type == "fp" else 8.0  # past the element range: FP8 448, FP4 6, ...
        tunable.v.view(-1)[:400] += over  # elements pushed past +max_norm (FP8: 448)
        tunable.v.view(-1)[-400:] -= over
        tunable.max_scale.copy_(0.4 + torch.rand(shape, generator=gen) * 0.6)
    return tunable


def _weight_and_grads(tunable: FloatTunableLayer, qdq_weight, probe: torch.Tensor):
    tunable.v.grad = tunable.max_scale.grad = None
    w = qdq_weight()
    (w * probe).sum().backward()
    return w.detach().clone(), tunable.v.grad.clone(), tunable.max_scale.grad.clone()


@pytest.mark.parametrize("init_scale", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_fused_element_stage_matches_plain_graph_bit_for_bit(name: str, seed: int, init_scale: bool) -> None:
    tunable = _tunable(name, seed, init_scale)
    probe = torch.randn(24, 128, generator=torch.Generator().manual_seed(seed + 7))
    plain = _weight_and_grads(tunable, lambda: tunable.layout.from_groups(tunable.qdq().weight), probe)
    fused = _weight_and_grads(tunable, tunable.qdq_weight, probe)
    for what, a, b in zip(("weight", "grad V", "grad max_scale"), plain, fused):
        assert torch.equal(a, b), f"{name}: {what} differs in {(a != b).sum().item()} of {a.numel()} entries"
    _, grad_v, grad_scale = fused
    assert (grad_v == 0).any() and (grad_v != 0).any()  # both clamp ends and the inside were exercised
    assert (grad_scale != 0).any()


@pytest.mark.parametrize("fmt", [E2M1, E2M3, E3M2, E4M3, E5M2], ids=lambda f: f.name)
def test_bfloat16_holds_every_element_value_exactly(fmt) -> None:
    """The node keeps the rounded elements in bfloat16 for its backward: no value of any format may change."""
    values = representable_values(fmt)
    values = torch.cat([values, -values])
    assert torch.equal(values.to(torch.bfloat16).float(), values)


def test_mxint_elements_fit_bfloat16() -> None:
    for fmt in (MX_FORMATS["mx_int4"], MX_FORMATS["mx_int8"]):
        k = torch.arange(-(2 ** (fmt.int_bits - 1) - 1), 2 ** (fmt.int_bits - 1), dtype=torch.float32)
        values = k * fmt.int_step
        assert torch.equal(values.to(torch.bfloat16).float(), values)


@pytest.mark.parametrize("name", ["MXFP4", "NVFP4", "FP8_STATIC"])
def test_fused_element_stage_keeps_fewer_bytes(name: str) -> None:
    tunable = _tunable(name, 0, False)
    n = tunable.grouped.numel()
    plain = saved_bytes(lambda: tunable.layout.from_groups(tunable.qdq().weight))
    fused = saved_bytes(tunable.qdq_weight)
    groups = n // tunable.grouped.shape[-1]
    # both keep a reference to the weight itself (4 bytes per weight, no copy) and a few fp32 values per group;
    # beyond that the plain graph keeps fp32 tensors of the weight's size, the node two bytes of element (bf16)
    # and one of mask per weight
    assert plain - 4 * n >= 8 * n
    assert fused - 4 * n <= 3 * n + 8 * 4 * groups
