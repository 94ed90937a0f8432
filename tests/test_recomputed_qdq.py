"""With recompute_qdq the float (MX / NVFP4 / FP8) tunables rebuild their qdq graph in the backward
pass (`tunable.recomputed_in_backward`): same fake-quantized weight and bit-identical gradients as the plain
autograd graph, while the forward keeps nothing for the backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from auto_round.algorithms.float_tunable import FloatTunableLayer
from auto_round.schemes import get_scheme
from autograd_probe import saved_bytes

FLOAT_SCHEMES = ["MXFP4", "MXFP8", "MXINT4", "NVFP4", "FP8_STATIC", "FP8_BLOCK"]


def _linear(out_features: int, in_features: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(out_features, 1) * 4)  # rows of different ranges
        lin.weight[0, :8] = 0.0  # an all-zero MX / NVFP4 block in the first row
    return lin


def _perturb(tunable, seed: int) -> None:
    """Non-trivial V and clip values, as after some SignRound steps (V within +-0.5, clips within their bound)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tunable.round_params():
            p.copy_((torch.rand(p.shape, generator=gen) - 0.5) * 0.9)
        for p in tunable.minmax_params():
            p.copy_(0.5 + torch.rand(p.shape, generator=gen) * 0.5)


def _weight_and_grads(tunable, qdq_weight, probe: torch.Tensor):
    params = tunable.round_params() + tunable.minmax_params()
    for p in params:
        p.grad = None
    w = qdq_weight()
    (w * probe).sum().backward()
    return w.detach().clone(), [p.grad.clone() for p in params]


def _plain_qdq(tunable):
    """The same qdq without the recomputation: the layer's own graph, kept from the forward."""
    return lambda: tunable.layout.from_groups(tunable.qdq().weight)


def _tunables():
    for name in FLOAT_SCHEMES:
        for seed in (0, 1):
            yield f"{name}-{seed}", lambda name=name, seed=seed: FloatTunableLayer(_linear(48, 256, seed), get_scheme(name),
                                                                                 recompute_qdq=True)


CASES = dict(_tunables())


@pytest.mark.parametrize("case", sorted(CASES))
def test_recomputed_qdq_matches_plain_graph_bit_for_bit(case: str) -> None:
    tunable = CASES[case]()
    _perturb(tunable, seed=7)
    probe = torch.randn(tunable.module.weight.shape, generator=torch.Generator().manual_seed(11))
    w_plain, g_plain = _weight_and_grads(tunable, _plain_qdq(tunable), probe)
    w_re, g_re = _weight_and_grads(tunable, tunable.qdq_weight, probe)
    assert torch.equal(w_plain, w_re)
    assert len(g_plain) == len(g_re) >= 1
    for a, b in zip(g_plain, g_re):
        assert torch.equal(a, b), f"{case}: gradient differs in {(a != b).sum().item()} of {a.numel()} entries"
    assert any(g.abs().sum() > 0 for g in g_re), "the probe must reach the parameters"


@pytest.mark.parametrize("name", ["MXFP4", "NVFP4", "FP8_STATIC"])
def test_recomputed_qdq_keeps_nothing_from_the_forward(name: str) -> None:
    plain = FloatTunableLayer(_linear(64, 512, 0), get_scheme(name))
    recomputed = FloatTunableLayer(_linear(64, 512, 0), get_scheme(name), recompute_qdq=True)
    n = plain.module.weight.numel()
    assert saved_bytes(plain.qdq_weight) > 4 * n  # without recomputation: at least the weight and its codes
    assert saved_bytes(recomputed.qdq_weight) == 0


def test_no_grad_qdq_weight_is_a_plain_call() -> None:
    tunable = FloatTunableLayer(_linear(16, 64, 0), get_scheme("MXFP4"), recompute_qdq=True)
    with torch.no_grad():
        w = tunable.qdq_weight()
    assert not w.requires_grad
    assert torch.equal(w, tunable.layout.from_groups(tunable.qdq().weight).detach())
