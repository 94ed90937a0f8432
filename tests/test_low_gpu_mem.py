"""low_gpu_mem_usage: where the SignRound walk keeps its cached block inputs (model/memory_plan.py, compressor_walk.py).

True (the default) keeps them in host memory; False keeps them on the accelerator when the memory plan has room
there beside the block's tuning, else on the host. The CPU-side checks are the plan's arithmetic and decision;
the CUDA test checks the chains really live there and that the result is the same bytes.
"""

from __future__ import annotations

import logging

import pytest
import torch

from auto_round.model.memory_plan import MemoryShape, estimate_signround_memory, plan_batches

SHAPE = MemoryShape(nsamples=64, seqlen=256, hidden=256, intermediate=512, heads=4, dtype_bytes=4,
                    weight_bytes=5_000_000, block_weight_elems=600_000, block_groups=20_000, packed_bytes=600_000)


def test_chains_on_the_device_count_there_not_on_the_host():
    host = estimate_signround_memory(SHAPE, 8)
    dev = estimate_signround_memory(SHAPE, 8, chains_on_device=True)
    assert dev.chains == host.chains == host.cached_inputs + host.call_args > 0
    assert host.host == host.chains + host.packed_output and dev.host == dev.packed_output
    assert dev.device_work == host.device_work + host.chains
    assert dev.total == host.total  # the same bytes, only elsewhere


def test_plan_keeps_chains_on_the_device_when_they_fit_else_moves_them_to_the_host():
    dev = estimate_signround_memory(SHAPE, 8, chains_on_device=True)
    roomy = plan_batches(SHAPE, 8, 1, available=10**12, device_available=dev.device_work + dev.model_weights,
                         chains_on_device=True)
    assert roomy.breakdown.chains_on_device and not roomy.adjusted
    tight = plan_batches(SHAPE, 8, 1, available=10**12, device_available=dev.device_work + dev.model_weights - 1,
                         chains_on_device=True)
    # on the host before anything that changes the numerics (the batch stays 8)
    assert not tight.breakdown.chains_on_device and not tight.adjusted and tight.breakdown.batch_size == 8
    assert not plan_batches(SHAPE, 8, 1, available=10**12, device_available=10**12).breakdown.chains_on_device


def _tiny_run(**kw):
    from tiny_models import random_ids, tiny_model
    from auto_round import AutoRound

    torch.manual_seed(0)
    return AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), iters=2, nsamples=8, seqlen=16, batch_size=4,
                     amp=False, disable_progress=True, **kw)


@pytest.mark.parametrize("room", ["roomy", "tight"])
def test_plan_asks_the_device_only_without_low_gpu_mem_usage(monkeypatch, caplog, room):
    import auto_round.model.memory_plan as plan
    from auto_round.model.blocks import iter_blocks

    ar = _tiny_run(device="cpu")
    blocks = list(iter_blocks(ar.model, ar.block_groups))
    shape = plan.memory_shape(ar.model, ar.layer_schemes, blocks, nsamples=8, seqlen=16, enable_quanted_input=True,
                              amp=False)
    need = estimate_signround_memory(shape, 4, chains_on_device=True)
    free = need.device_work + need.model_weights - (0 if room == "roomy" else 1)  # tight: fits only without chains
    monkeypatch.setattr(plan, "device_free", lambda device: free)  # as if cuda:0 had that much free
    kw = dict(nsamples=8, seqlen=16, device="cuda:0", enable_quanted_input=True, memory_limit=None)
    with caplog.at_level(logging.WARNING, logger="auto_round"):
        tuning, _, on_device = plan.plan_signround_memory(ar.model, ar.layer_schemes, blocks, ar.tuning,
                                                          low_gpu_mem_usage=False, **kw)
    assert on_device is (room == "roomy") and tuning.batch_size == 4
    assert any("stay in host memory" in r.message for r in caplog.records) is (room == "tight")
    _, _, default = plan.plan_signround_memory(ar.model, ar.layer_schemes, blocks, ar.tuning, **kw)
    assert default is False  # low_gpu_mem_usage=True by default
    _, _, on_cpu = plan.plan_signround_memory(ar.model, ar.layer_schemes, blocks, ar.tuning,
                                              **{**kw, "device": "cpu"}, low_gpu_mem_usage=False)
    assert on_cpu is False  # nothing to move on the CPU


def test_cli_flags():
    from auto_round.cli.main import build_parser

    assert build_parser().parse_args(["m"]).low_gpu_mem_usage is True
    assert build_parser().parse_args(["m", "--low_gpu_mem_usage"]).low_gpu_mem_usage is True
    assert build_parser().parse_args(["m", "--disable_low_gpu_mem_usage"]).low_gpu_mem_usage is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["m", "--low_gpu_mem_usage", "--disable_low_gpu_mem_usage"])


def test_cpu_run_is_unchanged_and_recorded_as_not_offloaded(tmp_path):
    import json

    outs = []
    for flag in (True, False):
        ar = _tiny_run(device="cpu", low_gpu_mem_usage=flag)
        ar.quantize_and_save(tmp_path / str(flag))
        outs.append((tmp_path / str(flag) / "model.safetensors").read_bytes())
        config = json.loads((tmp_path / str(flag) / "config.json").read_text())["quantization_config"]
        assert not config.get("low_gpu_mem_usage", False)  # nothing was offloaded from an accelerator
    assert outs[0] == outs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_chains_stay_on_the_device_with_the_same_result(tmp_path, monkeypatch):
    import auto_round.compressor_walk as walk

    seen = []
    capture = walk.capture_block_inputs
    monkeypatch.setattr(walk, "capture_block_inputs", lambda *a, **k: seen.append(str(k["store_device"])) or capture(*a, **k))
    outs = []
    for flag in (True, False):
        ar = _tiny_run(device="cuda", low_gpu_mem_usage=flag)
        ar.quantize_and_save(tmp_path / str(flag))
        outs.append((tmp_path / str(flag) / "model.safetensors").read_bytes())
    assert seen[0] == "cpu" and seen[1].startswith("cuda")
    assert outs[0] == outs[1]
