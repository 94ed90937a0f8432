"""The fused MX / NVFP4 activation qdq (one autograd node, hand-derived backward) against the composition
of small autograd ops in `qdq_mx` / `qdq_nvfp4`, which autograd differentiates independently: same
forward values bit for bit, same gradient up to fp32 rounding, including the edge cases the backward
has to get right (zero blocks, clamped elements, exponents clamped at -127, ties at the group max,
NVFP4 blocks whose scale underflows, a static global scale that clamps the block scale)."""

import pytest
import torch

from auto_round.quant.act_fused import GroupQdqKernels, group_qdq, group_qdq_backward, mx_forward, nvfp4_forward
from auto_round.quant.mx_qdq import get_mx_format, qdq_mx
from auto_round.quant.nvfp_qdq import global_scale, global_scale_from_amax, qdq_nvfp4


def grouped(group: int, seed: int = 0, rows: int = 64, n_groups: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_groups, group, generator=gen) * torch.rand(rows, n_groups, 1, generator=gen) * 4
    x[0, 0] = 0.0  # an all-zero group
    x[1, 1] = torch.randn(group, generator=gen) * 1e-39  # subnormal: the MX exponent clamps at -127
    x[2, 2, 3] = -300.0  # an outlier: most of its group rounds to 0
    x[3, 3, :4] = torch.tensor([2.5, -2.5, 2.5, 1.0])  # ties at the group max (3 elements share it)
    x[3, 3, 4:] = 0.1
    x[4, 4, :] = 0.75  # every element is the max
    return x


def compare(x, reference, fused, seed=1):
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    a = x.clone().requires_grad_(True)
    want = reference(a)
    want.backward(grad)
    b = x.clone().requires_grad_(True)
    got = fused(b)
    got.backward(grad)
    assert torch.equal(got.detach(), want.detach())
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the no-grad path (inference, the fp chain) gives the same values
        assert torch.equal(fused(x), want.detach())
    return a.grad, grad


MX_CASES = [("mx_fp4", "floor"), ("mx_fp4", "rceil"), ("mx_fp8", "floor"), ("mx_fp6", "floor"), ("mx_int8", "floor"),
            ("mx_int4", "floor")]


@pytest.mark.parametrize("name,rule", MX_CASES)
def test_mx_matches_the_autograd_composition(name, rule):
    fmt = get_mx_format(name)
    grad, upstream = compare(grouped(32), lambda t: qdq_mx(t, fmt, rule=rule).weight,
                             lambda t: group_qdq(t, mx_forward, (fmt, rule)))
    tied = grad[3, 3, :3] - upstream[3, 3, :3]  # the scale's term, shared by the three tied maxima
    assert (tied != 0).all() and torch.allclose(tied.abs(), tied.abs()[0].expand(3))
    assert torch.equal(grad[0, 0], upstream[0, 0])  # a zero block: only the straight-through term


def test_nvfp4_matches_the_autograd_composition():
    x = grouped(16)
    x[5, 5] = 1e-6  # block scale underflows in e4m3 (g * amax / 6 < 2^-10): quantizes to 0, no gradient
    g = global_scale(x)
    grad, _ = compare(x, lambda t: qdq_nvfp4(t, gscale=g).weight, lambda t: group_qdq(t, nvfp4_forward, (g,)))
    assert (grad[5, 5] == 0).all()


def test_nvfp4_static_global_scale_clamps_the_block_scale():
    x = grouped(16, seed=2)
    g = global_scale_from_amax(torch.tensor(0.5))  # far below the data's max: many block scales hit 448
    assert (g * x.abs().amax(-1) / 6 > 448).any()
    compare(x, lambda t: qdq_nvfp4(t, gscale=g).weight, lambda t: group_qdq(t, nvfp4_forward, (g,)))


def test_kernels_wrapper_is_used():
    calls = []

    def wrap(fn):
        def run(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return run

    fmt = get_mx_format("mx_fp4")
    x = grouped(32).requires_grad_(True)
    group_qdq(x, mx_forward, (fmt, "floor"), GroupQdqKernels(wrap)).sum().backward()
    assert calls == ["mx_forward", group_qdq_backward.__name__]


def counting_kernels(calls: list) -> GroupQdqKernels:
    def wrap(fn):
        def run(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return run
    return GroupQdqKernels(wrap)


def test_layers_fed_the_same_tensor_quantize_it_once():
    from auto_round.algorithms.act_quant import ActQuantizer, SharedInputQdq
    from auto_round.schemes import get_scheme

    scheme = get_scheme("MXFP4")
    calls, shared = [], SharedInputQdq()
    q, k, v = (ActQuantizer(scheme, kernels=counting_kernels(calls), shared=shared) for _ in range(3))
    alone = ActQuantizer(scheme)
    x = torch.randn(4, 8, 64).requires_grad_(True)
    outs = [q(x), k(x), v(x)]
    assert calls == ["mx_forward"] and outs[0] is outs[1] is outs[2]
    weights = [torch.randn(4, 8, 64) for _ in range(3)]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    got, x.grad = x.grad, None
    sum((alone(x) * w).sum() for w in weights).backward()  # three separate qdqs
    torch.testing.assert_close(got, x.grad, rtol=1e-6, atol=1e-6)
    y = x.detach().clone().requires_grad_(True)
    q(y)  # another tensor: computed again
    with torch.no_grad():
        q(y)  # other grad mode: computed again
    y.data.mul_(2)  # modified in place (version bump): computed again
    q(y)
    assert calls.count("mx_forward") == 4
    other = ActQuantizer(get_scheme("MXFP8"), shared=shared)  # another key on the same tensor: its own qdq
    assert torch.equal(other(y), ActQuantizer(get_scheme("MXFP8"))(y)) and not torch.equal(other(y), q(y))
    shared.clear()
    assert shared._slot is None


def test_a_tunable_static_clip_is_never_shared():
    from auto_round.algorithms.act_quant import ActQuantizer, SharedInputQdq
    from auto_round.schemes import get_scheme

    shared = SharedInputQdq()
    scheme = get_scheme("FP8_STATIC")
    a, b = (ActQuantizer(scheme, torch.tensor(3.0), tune_clip=True, shared=shared) for _ in range(2))
    assert a.shared is None and b.shared is None  # each layer's clip is its own parameter
    fixed = ActQuantizer(scheme, torch.tensor(3.0), tune_clip=False, shared=shared)
    assert fixed.shared is shared


def test_a_second_quantizer_on_a_layer_replaces_the_first():
    """Tuning a block again (a benchmark's repeated runs, a retry) installs new quantizers on layers that
    still carry the last ones: the input must be quantized once, by the newest, not twice."""
    from torch import nn

    from auto_round.algorithms.act_quant import ACT_QUANTIZER_ATTR, ActQuantizer
    from auto_round.schemes import get_scheme

    calls = []
    layer = nn.Linear(64, 8)
    x = torch.randn(4, 64)
    first = ActQuantizer(get_scheme("MXFP4"), kernels=counting_kernels(calls))
    first.install(layer)
    first.install(layer)  # idempotent
    once = layer(x)
    assert calls == ["mx_forward"] and getattr(layer, ACT_QUANTIZER_ATTR) is first
    second = ActQuantizer(get_scheme("MXFP8"), kernels=counting_kernels(calls))
    second.install(layer)
    got = layer(x)
    assert calls == ["mx_forward"] * 2 and getattr(layer, ACT_QUANTIZER_ATTR) is second
    assert torch.equal(got, nn.functional.linear(ActQuantizer(get_scheme("MXFP8"))(x), layer.weight, layer.bias))
    assert not torch.equal(got, once)
    first.remove()  # removing the replaced one leaves the newest in place
    assert getattr(layer, ACT_QUANTIZER_ATTR) is second
    second.remove()
    assert not hasattr(layer, ACT_QUANTIZER_ATTR) and torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
