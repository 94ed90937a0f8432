"""torch.compile of the MX / NVFP4 activation qdq: when it is chosen, that a compile failure falls back to
eager, and that the compiled kernels give the eager values and gradients."""

import logging

import pytest
import torch

from auto_round.algorithms import compile as comp
from auto_round.quant.act_fused import group_qdq, mx_forward, nvfp4_forward
from auto_round.quant.mx_qdq import get_mx_format
from auto_round.quant.nvfp_qdq import global_scale
from auto_round.schemes import get_scheme

@pytest.mark.parametrize("enable,scheme,want", [
    (True, "MXFP4", True),
    (True, "NVFP4", True),
    (None, "MXFP4", False),  # default: eager (bytes independent of an installed compiler)
    (False, "MXFP4", False),
    (True, "W4A16", False),  # no activation qdq to compile
    (True, "FP8_STATIC", False),  # fp8 activations do not use the fused kernels
])
def test_when_the_activation_qdq_is_compiled(monkeypatch, enable, scheme, want):
    monkeypatch.setattr(comp, "compiler_available", lambda device: True)
    got = comp.act_qdq_kernels(enable, device="cpu", schemes=[get_scheme(scheme)])
    assert (got is comp.COMPILED_KERNELS) == want


def test_no_compiler_means_eager_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(comp.shutil, "which", lambda name: None)
    assert not comp.compiler_available("cpu")
    with caplog.at_level(logging.WARNING, logger="auto_round"):
        assert comp.act_qdq_kernels(True, device="cpu", schemes=[get_scheme("MXFP4")]) is None
    assert "no compiler" in caplog.text


def test_a_failing_compile_falls_back_to_eager_once(monkeypatch, caplog):
    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("InductorError: C++ compile error\nlong log")
        return run

    monkeypatch.setattr(comp.torch, "compile", broken_compile)
    kernel = comp._CompiledKernel(mx_forward)
    x = torch.randn(8, 4, 32)
    fmt = get_mx_format("mx_fp4")
    with caplog.at_level(logging.WARNING, logger="auto_round"):
        out = kernel(x, False, fmt, "floor")[0]
        kernel(x, False, fmt, "floor")
    assert torch.equal(out, mx_forward(x, False, fmt, "floor")[0])
    assert kernel.failed and caplog.text.count("torch.compile of mx_forward failed") == 1


@pytest.mark.skipif(not comp.compiler_available("cpu"), reason="no C++ compiler for Inductor")
def test_compiled_kernels_match_eager():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, 32, generator=gen) * torch.rand(96, 12, 1, generator=gen) * 4
    x[0, 0] = 0.0
    fmt = get_mx_format("mx_fp4")
    cases = [(x, mx_forward, (fmt, "floor")), (x.reshape(96, 24, 16), nvfp4_forward, (global_scale(x),))]
    for data, forward, args in cases:
        grad = torch.randn(data.shape, generator=gen)
        results = []
        for kernels in (None, comp.COMPILED_KERNELS):
            t = data.clone().requires_grad_(True)
            out = group_qdq(t, forward, args, kernels)
            out.backward(grad)
            results.append((out.detach(), t.grad))
        (want, want_grad), (got, got_grad) = results
        assert not comp._COMPILED[forward].failed
        assert torch.equal(got, want), forward.__name__
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not comp.compiler_available("cpu"), reason="no C++ compiler for Inductor")
def test_signround_with_compiled_activation_qdq(one_thread):
    from auto_round import AutoRound
    from tiny_models import random_ids, tiny_model

    runs = {}
    for enable in (False, True):
        model = tiny_model("llama")
        ar = AutoRound(model, scheme="MXFP4", dataset=random_ids(8, 16), nsamples=8, seqlen=16, batch_size=4,
                       iters=4, amp=False, enable_torch_compile=enable)
        ar.quantize()
        assert ar.tuning.compile_act_qdq is enable
        runs[enable] = ({n: m.weight.detach().clone() for n, m in ar.model.named_modules()
                         if n in ar.results}, [s.loss_best for s in ar.block_stats.values()])
    assert not comp._COMPILED[mx_forward].failed  # the compiled kernels ran
    (w_eager, loss_eager), (w_comp, loss_comp) = runs[False], runs[True]
    torch.testing.assert_close(loss_comp, loss_eager, rtol=1e-4, atol=0)
    same = sum(int(torch.equal(w_comp[n], w_eager[n])) for n in w_eager)
    assert same >= 0.9 * len(w_eager), f"{same}/{len(w_eager)} layers identical"
