"""fp8_clip_tuning: SignRound leaves the clip of fp8 weights and static fp8 activations at 1 unless asked.

With the default, an all-FP8_STATIC model tunes V alone: the same result, bit for bit, as
enable_minmax_tuning=False, weight scales equal to RTN's (per-channel amax / 448) and input ranges equal to the
calibrated maxima. fp8_clip_tuning=True restores the reference's behaviour, where both clips move. Integer and
other float layers keep their clip tuning either way.
"""

import pytest
import torch

from auto_round import AutoRound
from auto_round.algorithms.signround import SignRoundConfig, tunes_act_clip, tunes_weight_clip
from auto_round.cli.main import build_parser
from auto_round.schemes import get_scheme
from tiny_models import random_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


@pytest.mark.parametrize("name, weight_default, act_default", [
    ("FP8_STATIC", False, False), ("FP8_BLOCK", False, False), ("FPW8A16", False, False),
    ("W4A16", True, True), ("MXFP4", True, True), ("NVFP4", True, True), ("MXFP8", True, True),
])
def test_which_clips_are_tuned(name, weight_default, act_default):
    scheme = get_scheme(name)
    default, reference, off = SignRoundConfig(), SignRoundConfig(fp8_clip_tuning=True), \
        SignRoundConfig(enable_minmax_tuning=False, fp8_clip_tuning=True)
    assert tunes_weight_clip(scheme, default) is weight_default
    assert tunes_act_clip(scheme, default) is act_default
    assert tunes_weight_clip(scheme, reference) and tunes_act_clip(scheme, reference)
    assert not tunes_weight_clip(scheme, off) and not tunes_act_clip(scheme, off)


def _quantize(scheme="FP8_STATIC", **kw):
    torch.manual_seed(0)
    ar = AutoRound(tiny_model("llama"), scheme=scheme, iters=6, lr=0.05, dataset=random_ids(8, 16), nsamples=8,
                   seqlen=16, batch_size=4, amp=False, low_cpu_mem_usage=False, disable_progress=True, **kw)
    ar.quantize()
    return ar


def _weight_amax(ar, name):
    # the original weight's per-channel max |w| is what RTN's scale is made of; the tuned layer has been
    # overwritten in place, so recompute it from a fresh copy of the same model
    fresh = dict(tiny_model("llama").named_modules())[name]
    return fresh.weight.detach().abs().amax(dim=1, keepdim=True)


def test_default_tunes_fp8_rounding_only():
    default, no_minmax = _quantize(), _quantize(enable_minmax_tuning=False)
    assert default.results.keys() == no_minmax.results.keys()
    for name, res in default.results.items():
        other = no_minmax.results[name]
        assert torch.equal(res.codes.view(torch.uint8), other.codes.view(torch.uint8)), name
        assert torch.equal(res.scale, other.scale) and torch.equal(res.act_max, other.act_max), name
        torch.testing.assert_close(res.scale, _weight_amax(default, name) / 448.0, rtol=1e-6, atol=0)


def test_fp8_clip_tuning_moves_both_clips_as_the_reference():
    default, tuned = _quantize(), _quantize(fp8_clip_tuning=True)
    weight_moved = sum(not torch.equal(tuned.results[n].scale, r.scale) for n, r in default.results.items())
    act_shrunk = sum(bool(tuned.results[n].act_max < r.act_max) for n, r in default.results.items())
    assert weight_moved > 0 and act_shrunk > 0
    assert tuned.tuning.fp8_clip_tuning and not default.tuning.fp8_clip_tuning


def test_other_types_keep_their_clip_tuning():
    mixed = {"layer_config": {"down_proj": "FP8_STATIC"}, "group_size": 32}
    q_proj, down_proj = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    rounding_only = _quantize("W4A16", enable_minmax_tuning=False, **mixed).results
    for kw in ({}, {"fp8_clip_tuning": True}):
        got = _quantize("W4A16", **kw, **mixed).results
        assert not torch.equal(got[q_proj].scale, rounding_only[q_proj].scale)  # the int clip (alpha / beta) moved
        fp8_fixed = torch.equal(got[down_proj].act_max, rounding_only[down_proj].act_max)
        assert fp8_fixed is not bool(kw), kw  # the fp8 layer's act clip moves only with fp8_clip_tuning


def test_cli_flag():
    args = build_parser().parse_args(["--model", "m", "--enable_fp8_clip_tuning"])
    assert args.enable_fp8_clip_tuning
    assert not build_parser().parse_args(["--model", "m"]).enable_fp8_clip_tuning
