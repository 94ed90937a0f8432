"""The memory planner (model/memory_plan.py): its arithmetic, its decisions, and its prediction against a measured peak.

The measured peak is ru_maxrss of a fresh subprocess (a high-water mark, so the process must be new) minus its RSS
just before quantize(); settings are chosen so that the cached block inputs (5 chains of 64 x 256 x 256 fp32 =
16 MiB each) dominate. Stated factor: measured / predicted in [0.5, 2].
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from auto_round.model.memory_plan import (MemoryPlanError, MemoryShape, estimate_signround_memory, parse_memory,
                                          plan_batches)

SHAPE = MemoryShape(nsamples=64, seqlen=256, hidden=256, intermediate=512, heads=4, dtype_bytes=4,
                    weight_bytes=5_000_000, block_weight_elems=600_000, block_groups=20_000, packed_bytes=600_000)


def test_breakdown_sums_and_scales_linearly():
    br = estimate_signround_memory(SHAPE, 8)
    assert br.total == sum(br.components().values())
    chain = 64 * 256 * 256 * 4
    assert br.cached_inputs == 5 * chain  # fp_in, targets, q_in old + new, and the cat of run_batched
    double_n = estimate_signround_memory(dataclasses.replace(SHAPE, nsamples=128), 8)
    assert double_n.cached_inputs == 2 * br.cached_inputs
    assert double_n.activations == br.activations  # the micro-batch, not nsamples, sets activations
    double_t = estimate_signround_memory(dataclasses.replace(SHAPE, seqlen=512), 8)
    assert double_t.cached_inputs == 2 * br.cached_inputs and double_t.activations == 2 * br.activations
    half_b = estimate_signround_memory(SHAPE, 4)
    assert half_b.activations * 2 == br.activations and half_b.cached_inputs == br.cached_inputs
    no_q = estimate_signround_memory(dataclasses.replace(SHAPE, enable_quanted_input=False), 8)
    assert no_q.cached_inputs == 3 * chain


def test_plan_keeps_settings_that_fit_and_halves_batches_that_do_not():
    fit = plan_batches(SHAPE, 8, 1, available=10**12)
    assert not fit.adjusted and fit.breakdown.batch_size == 8
    need_b2 = estimate_signround_memory(SHAPE, 2).total
    dec = plan_batches(SHAPE, 8, 1, available=need_b2)
    assert dec.adjusted and (dec.breakdown.batch_size, dec.breakdown.gradient_accumulate_steps) == (2, 4)
    with pytest.raises(MemoryPlanError, match="--nsamples"):
        plan_batches(SHAPE, 8, 1, available=need_b2, auto_adjust=False)
    with pytest.raises(MemoryPlanError, match="--seqlen"):
        plan_batches(SHAPE, 8, 1, available=estimate_signround_memory(SHAPE, 1).cached_inputs)


def test_parse_memory():
    assert parse_memory("12GB") == 12 * 10**9 and parse_memory("1.5GiB") == int(1.5 * 2**30) and parse_memory(None) is None
    for bad in ("lots", "-1GB", "12XB", 0):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_impossible_limit_raises_before_tuning(monkeypatch):
    from tiny_models import random_ids, tiny_model
    from auto_round import AutoRound
    import auto_round.compressor_walk as comp

    called = []
    monkeypatch.setattr(comp, "capture_block_inputs", lambda *a, **k: called.append(1))
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), iters=2, nsamples=8, seqlen=16, batch_size=4,
                   memory_limit="1KB", device="cpu")
    with pytest.raises(MemoryPlanError, match="available"):
        ar.quantize()
    assert not called  # refused before the block inputs were captured


def test_prediction_matches_measured_peak():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    worker = Path(__file__).with_name("memory_plan_worker.py")
    runs = []
    for _ in range(2):  # a high-water mark is noisy (allocator timing): the smaller of two fresh measurements
        out = subprocess.run([sys.executable, str(worker), "64", "256", "4", "sdpa"], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = min(runs, key=lambda r: r["measured"])
    ratio = res["measured"] / res["predicted"]
    assert 0.5 <= ratio <= 2.0, runs


FLOAT_SHAPE = dataclasses.replace(SHAPE, block_weight_elems=60_000_000, block_qdq_graph_bytes=240_000_000,
                                  block_recomputable_graph_bytes=240_000_000, largest_recomputable_graph_bytes=80_000_000)


def test_recompute_qdq_drops_all_but_the_largest_layers_graph():
    plain = estimate_signround_memory(FLOAT_SHAPE, 8)
    recomputed = estimate_signround_memory(FLOAT_SHAPE, 8, recompute_qdq=True)
    assert plain.block_state - recomputed.block_state == 240_000_000 - 80_000_000
    assert recomputed.recompute_qdq and "recompute_qdq" in recomputed.table()
    int_only = dataclasses.replace(FLOAT_SHAPE, block_qdq_graph_bytes=None, block_recomputable_graph_bytes=0,
                                   largest_recomputable_graph_bytes=0)
    assert estimate_signround_memory(int_only, 8, recompute_qdq=True).block_state == \
        estimate_signround_memory(int_only, 8).block_state


def test_plan_turns_recompute_qdq_on_before_halving_the_batch():
    need = estimate_signround_memory(FLOAT_SHAPE, 8, recompute_qdq=True).total
    assert estimate_signround_memory(FLOAT_SHAPE, 8).total > need
    for auto_adjust in (True, False):  # recomputing changes no result, so it needs no permission
        dec = plan_batches(FLOAT_SHAPE, 8, 1, available=need, auto_adjust=auto_adjust)
        assert dec.breakdown.recompute_qdq and not dec.adjusted and dec.breakdown.batch_size == 8
    # not enough even so: both, the batch halved on top of the recomputation
    dec = plan_batches(FLOAT_SHAPE, 8, 1, available=estimate_signround_memory(FLOAT_SHAPE, 4, recompute_qdq=True).total)
    assert dec.breakdown.recompute_qdq and dec.adjusted and dec.breakdown.batch_size == 4
    # integer blocks have nothing to recompute: straight to halving, as before
    int_only = dataclasses.replace(FLOAT_SHAPE, block_qdq_graph_bytes=None, block_recomputable_graph_bytes=0,
                                   largest_recomputable_graph_bytes=0)
    dec = plan_batches(int_only, 8, 1, available=estimate_signround_memory(int_only, 4).total)
    assert not dec.breakdown.recompute_qdq and dec.breakdown.batch_size == 4
    assert not plan_batches(FLOAT_SHAPE, 8, 1, available=10**12).breakdown.recompute_qdq


def test_memory_limit_turns_recompute_qdq_on_with_the_same_result(tmp_path, caplog):
    from tiny_models import random_ids, tiny_model
    from auto_round import AutoRound
    from auto_round.model.memory_plan import memory_shape
    from auto_round.model.blocks import iter_blocks

    def run(out, **kw):
        torch.manual_seed(0)
        ar = AutoRound(tiny_model("llama"), scheme="MXFP4", dataset=random_ids(8, 16), iters=3, nsamples=8,
                       seqlen=16, batch_size=4, device="cpu", **kw)
        ar.quantize_and_save(tmp_path / out)
        return ar, (tmp_path / out / "model.safetensors").read_bytes()

    probe = AutoRound(tiny_model("llama"), scheme="MXFP4", dataset=random_ids(8, 16), iters=3, nsamples=8, seqlen=16,
                      batch_size=4, device="cpu")
    shape = memory_shape(probe.model, probe.layer_schemes, list(iter_blocks(probe.model, probe.block_groups)),
                         nsamples=8, seqlen=16, enable_quanted_input=True, amp=probe.tuning.amp_dtype is not None)
    assert shape.block_recomputable_graph_bytes > 0
    limit = estimate_signround_memory(shape, 4, recompute_qdq=True).total  # fits only with the recomputation
    plain_ar, plain = run("plain")
    assert not plain_ar.tuning.recompute_qdq
    with caplog.at_level("WARNING", logger="auto_round"):
        limited_ar, limited = run("limited", memory_limit=limit, auto_adjust_memory=False)
    assert limited_ar.tuning.recompute_qdq and limited_ar.tuning.batch_size == 4
    assert any("recompute_qdq on" in r.message for r in caplog.records)
    assert limited == plain  # same bytes: the recomputation changes memory, not results
    forced_ar, forced = run("forced", recompute_qdq=True)
    assert forced_ar.tuning.recompute_qdq and forced == plain


def test_large_block_reuse_needs_room_for_one_more_micro_batch_of_activations():
    from auto_round.model.memory_plan import room_for_large_block_reuse

    br = estimate_signround_memory(SHAPE, 8)
    assert room_for_large_block_reuse(br, None)  # free memory unknown: nothing is checked, as for the plan
    assert room_for_large_block_reuse(br, br.total + br.activations)
    assert not room_for_large_block_reuse(br, br.total + br.activations - 1)
    assert not room_for_large_block_reuse(br, br.total)  # fits, but the heap's holes could push it over


@pytest.mark.parametrize("limit, reuse, expected", [("1TB", True, True), ("1TB", False, False), ("tight", True, False)])
def test_walk_keeps_large_blocks_only_with_room(monkeypatch, limit, reuse, expected):
    from contextlib import nullcontext

    from tiny_models import random_ids, tiny_model
    from auto_round import AutoRound
    from auto_round.model.blocks import iter_blocks
    from auto_round.model.memory_plan import memory_shape
    import auto_round.compressor_walk as walk

    seen = []
    monkeypatch.setattr(walk, "large_blocks_reused", lambda enabled: seen.append(enabled) or nullcontext(enabled))
    kw = dict(dataset=random_ids(8, 16), iters=1, nsamples=8, seqlen=16, batch_size=4, device="cpu", amp=False,
              disable_progress=True, reuse_freed_memory=reuse)
    ar = AutoRound(tiny_model("llama"), **kw)
    if limit == "tight":  # what the plan predicts: it fits, with no micro-batch to spare
        shape = memory_shape(ar.model, ar.layer_schemes, list(iter_blocks(ar.model, ar.block_groups)), nsamples=8,
                             seqlen=16, enable_quanted_input=True, amp=False)
        ar.memory_limit = estimate_signround_memory(shape, 4).total
    else:
        ar.memory_limit = limit
    ar.quantize()
    assert seen == [expected] and ar.tuning.batch_size == 4
