"""massive_token_cap: tokens whose fp output norm is far above the median count with a capped weight.

Checked against hand-computed factors and against the loss written out by hand from the layer's
iteration-0 (RTN) output; with nothing capped the result is the plain loss bit for bit.
"""

import json
import math

import pytest
import torch
from torch import nn

from auto_round import AutoRound
from auto_round.cli.main import main
from auto_round.algorithms.signround import SignRoundConfig, token_loss_scale, tune_block
from auto_round.schemes import resolve_scheme
from tiny_models import random_ids, saved_tiny_model, tiny_model, word_text_file


def test_factor_is_cap_times_median_over_norm_for_capped_tokens_only():
    targets = torch.zeros(1, 5, 2)
    targets[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 300.0])  # token norms; median of the counted ones
    mask = torch.ones(1, 5, 1)
    mask[0, 3] = 0.0  # not counted: the median is over 1, 2, 3, 300 -> torch's lower median 2
    scale = token_loss_scale(targets, mask, cap=4.0)
    assert scale.shape == (1, 5, 1)
    assert scale[0, :4, 0].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert scale[0, 4, 0].item() == pytest.approx(4.0 * 2.0 / 300.0)


def test_nothing_over_the_cap_or_all_zero_targets_means_no_weighting():
    targets = torch.randn(3, 7, 4)
    mask = torch.ones(3, 7, 1)
    assert token_loss_scale(targets, mask, cap=1e6) is None
    assert token_loss_scale(torch.zeros(3, 7, 4), mask, cap=4.0) is None
    assert token_loss_scale(targets, torch.zeros(3, 7, 1), cap=4.0) is None


def _first_loss(cap: float, x, targets, mask):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32, bias=False)
    outputs = []

    def run(idx):
        out = layer(x[idx])
        order = torch.tensor(idx).argsort()  # the sampler shuffles; hand back sample order
        outputs.append(out.detach()[order])
        return out

    config = SignRoundConfig(iters=1, batch_size=x.shape[0], massive_token_cap=cap)
    _, stats = tune_block({"lin": (layer, resolve_scheme("W2A16G32"))}, run, targets, mask, config)
    return stats.loss_first, outputs[0]


def test_first_loss_is_the_capped_mse_written_out_by_hand():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        targets = nn.Linear(64, 32, bias=False)(x)
    targets[:, 0] *= 500.0  # an attention-sink-like token in every sample
    mask = torch.ones(2, 6, 1)
    mask[:, -1] = 0.0
    plain, out = _first_loss(0.0, x, targets, mask)
    capped, out_capped = _first_loss(3.0, x, targets, mask)
    assert torch.equal(out, out_capped)  # same RTN start; only the loss differs
    norms = targets.norm(dim=-1, keepdim=True)
    limit = 3.0 * norms[mask > 0].median()
    weight = torch.where(norms > limit, limit / norms, torch.ones_like(norms))
    count = targets.numel()
    assert plain == pytest.approx((((out - targets) * mask) ** 2).sum().item() / count, rel=1e-5)
    assert capped == pytest.approx((((out - targets) * mask * weight) ** 2).sum().item() / count, rel=1e-5)
    assert capped < 0.1 * plain  # the sink tokens dominated the plain loss


def test_no_capped_token_gives_the_plain_result_bit_for_bit():
    """Random tiny models have no massive activations: a high cap leaves every weight as without it."""
    def weights(cap):
        ar = AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), nsamples=8, seqlen=16, batch_size=4,
                       iters=4, group_size=32, amp=False, massive_token_cap=cap, low_cpu_mem_usage=False)
        ar.quantize()
        return {n: r.codes.clone() for n, r in ar.results.items()}, [s.loss_best for s in ar.block_stats.values()]

    (plain, plain_loss), (capped, capped_loss) = weights(0.0), weights(1000.0)
    assert plain.keys() == capped.keys()
    assert all(torch.equal(plain[n], capped[n]) for n in plain)
    assert plain_loss == capped_loss


def test_default_cap_is_4_and_the_cli_passes_it(tmp_path):
    assert AutoRound(tiny_model("llama"), iters=1, dataset=random_ids(2, 8)).tuning.massive_token_cap == 4.0
    model_dir = saved_tiny_model(tmp_path / "tiny")
    text = word_text_file(tmp_path / "calib.txt", 2000)
    out = tmp_path / "out"
    rc = main([str(model_dir), "--iters", "2", "--nsamples", "2", "--seqlen", "16", "--batch_size", "2",
               "--dataset", str(text), "--massive_token_cap", "0", "--output_dir", str(out)])
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["massive_token_cap"] == 0.0


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan, "4", True])
def test_bad_cap_is_refused(bad):
    with pytest.raises(ValueError, match="massive_token_cap"):
        AutoRound(tiny_model("llama"), iters=1, dataset=random_ids(2, 8), massive_token_cap=bad)
