"""fp8_clip_tuning: SignRound leaves the clip (max_scale) of fp8 (FP8, MXFP8) weights at 1 unless asked.

With the default, FP8 layers tune V (and a static activation clip) only: their weight scales stay RTN's
(per-channel amax / 448). fp8_clip_tuning=True restores the reference's behaviour, where the weight clip moves
too. MXFP8 likewise keeps RTN's shared exponents. Integer and other float layers keep their clip tuning either
way.
"""

import json

import pytest
import torch

from auto_round import AutoRound
from auto_round.algorithms.signround import SignRoundConfig, tunes_weight_clip
from auto_round.cli.main import build_parser
from auto_round.schemes import get_scheme
from tiny_models import random_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


@pytest.mark.parametrize("name, default", [
    ("FP8_STATIC", False), ("FP8_BLOCK", False), ("FPW8A16", False),
    ("W4A16", True), ("W2A16G64", True), ("MXFP4", True), ("NVFP4", True), ("MXFP8", False),
    ("MXFP8_RCEIL", False), ("MXFP6", True), ("MXINT4", True),
])
def test_which_weight_clips_are_tuned(name, default):
    scheme = get_scheme(name)
    assert tunes_weight_clip(scheme, SignRoundConfig()) is default
    assert tunes_weight_clip(scheme, SignRoundConfig(fp8_clip_tuning=True))
    assert not tunes_weight_clip(scheme, SignRoundConfig(enable_minmax_tuning=False, fp8_clip_tuning=True))


def _quantize(scheme="FP8_STATIC", **kw):
    torch.manual_seed(0)
    kw = {"iters": 6, "lr": 0.05, **kw}
    ar = AutoRound(tiny_model("llama"), scheme=scheme, dataset=random_ids(8, 16), nsamples=8, seqlen=16,
                   batch_size=4, amp=False, low_cpu_mem_usage=False, disable_progress=True, **kw)
    ar.quantize()
    return ar


def _rtn_scale(name):
    # RTN's per-channel scale is the original weight's max |w| / 448; the tuned layer was overwritten in place,
    # so read the weight from a fresh copy of the same (seeded) model
    fresh = dict(tiny_model("llama").named_modules())[name]
    return fresh.weight.detach().abs().amax(dim=1, keepdim=True) / 448.0


def test_default_keeps_fp8_weight_scales_and_tunes_the_rest():
    default = _quantize()
    for name, res in default.results.items():
        torch.testing.assert_close(res.scale, _rtn_scale(name), rtol=1e-6, atol=0)
    rounding_only = _quantize(enable_minmax_tuning=False)
    # V was tuned (the codes are not RTN's everywhere) and so was the static activation clip
    assert any(not torch.equal(r.act_max, rounding_only.results[n].act_max) for n, r in default.results.items())
    rtn = _quantize(iters=0, lr=None)
    assert any(not torch.equal(r.codes.view(torch.uint8), rtn.results[n].codes.view(torch.uint8))
               for n, r in default.results.items())


def test_fp8_clip_tuning_moves_the_weight_clip_as_the_reference():
    tuned = _quantize(fp8_clip_tuning=True)
    moved = [n for n, r in tuned.results.items() if not torch.allclose(r.scale, _rtn_scale(n), rtol=1e-6, atol=0)]
    assert moved and all(bool((tuned.results[n].scale <= _rtn_scale(n) * (1 + 1e-6)).all()) for n in moved)
    assert tuned.tuning.fp8_clip_tuning and not _quantize(iters=1).tuning.fp8_clip_tuning


def test_mxfp8_block_scales_stay_rtn_unless_asked():
    # MXFP8: e4m3 elements under a power-of-two scale per 32. By default the shared exponents are plain RTN's
    # (floor(log2 amax) - 8 per block) while the rounding (V) is tuned; with the flag the multiplier may drop a
    # block to the next lower exponent, never raise it
    rtn = _quantize("MXFP8", iters=0, lr=None, disable_opt_rtn=True).results
    # a multiplier must fall below 2^e / amax to lower a block's exponent: 10 steps of 0.1 let it
    default = _quantize("MXFP8", iters=10, lr=0.1).results
    tuned = _quantize("MXFP8", iters=10, lr=0.1, fp8_clip_tuning=True).results
    for name, res in default.items():
        torch.testing.assert_close(res.scale, rtn[name].scale, rtol=0, atol=0)
    assert any(not torch.equal(r.codes.view(torch.uint8), rtn[n].codes.view(torch.uint8)) for n, r in default.items())
    assert any(not torch.equal(r.scale, rtn[n].scale) for n, r in tuned.items())
    assert all(bool((r.scale <= rtn[n].scale).all()) for n, r in tuned.items())


def test_other_types_keep_their_clip_tuning():
    mixed = {"layer_config": {"down_proj": "FP8_STATIC"}, "group_size": 32}
    q_proj, down_proj = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    rounding_only = _quantize("W4A16", enable_minmax_tuning=False, **mixed).results
    for kw in ({}, {"fp8_clip_tuning": True}):
        got = _quantize("W4A16", **kw, **mixed).results
        assert not torch.equal(got[q_proj].scale, rounding_only[q_proj].scale)  # the int clip (alpha / beta) moved
        fp8_fixed = torch.allclose(got[down_proj].scale, _rtn_scale(down_proj), rtol=1e-6, atol=0)
        assert fp8_fixed is not bool(kw), kw  # the fp8 layer's weight clip moves only with fp8_clip_tuning


def test_cli_flag_and_recorded_setting(tmp_path):
    args = build_parser().parse_args(["--model", "m", "--enable_fp8_clip_tuning"])
    assert args.enable_fp8_clip_tuning
    assert not build_parser().parse_args(["--model", "m"]).enable_fp8_clip_tuning
    ar = _quantize(fp8_clip_tuning=True)
    out = tmp_path / "out"
    ar.save_quantized(out, format="auto_round")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["fp8_clip_tuning"] is True
