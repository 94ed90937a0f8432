"""opt-RTN: the scale search against a brute-force loop, and its routing in AutoRound / the CLI."""

import logging

import pytest
import torch

from auto_round import AutoRound
from auto_round.quant.int_qdq import GroupLayout, group_range, qdq_int, quantize_weight_rtn
from auto_round.quant.opt_rtn import divisor_grid, fill_importance, search_sym_clip_factor
from tiny_models import random_ids, tiny_model


def weighted_error(grouped, w_hat, importance):
    return (importance * (w_hat - grouped).pow(2)).sum(-1)


def brute_force_divisor(w: list[float], imp: list[float], bits: int) -> float:
    """Python-scalar loop over the grid for one group: the independent reference."""
    half = 2 ** (bits - 1)
    lo, hi = min(min(w), 0.0), max(max(w), 0.0)
    signed_max = hi * -1.0 if hi >= -lo else -lo
    best, best_d = float("inf"), None
    for d in divisor_grid(bits).tolist():
        s = float(torch.tensor(signed_max / d).half())
        s = min(s, -1e-5) if s < 0 else max(s, 1e-5)
        err = sum(i * (s * min(max(round(x / s), -half), half - 1) - x) ** 2 for x, i in zip(w, imp))
        if err < best:
            best, best_d = err, d
    return best_d


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_search_matches_a_brute_force_loop(bits):
    torch.manual_seed(bits)
    grouped = torch.randn(3, 2, 16)
    importance = torch.rand(3, 2, 16) * 4
    wmin, wmax = group_range(grouped)
    factor = search_sym_clip_factor(grouped, bits, importance, wmin, wmax)
    half = 2 ** (bits - 1)
    for r in range(3):
        for g in range(2):
            d = brute_force_divisor(grouped[r, g].tolist(), importance[r, g].tolist(), bits)
            assert half / factor[r, g].item() == pytest.approx(d, rel=1e-6)


@pytest.mark.parametrize("slice_elements", [1, 40, 100])
def test_search_in_row_slices_matches_the_brute_force_loop(monkeypatch, slice_elements):
    """Rows are searched in slices (one row, 1-2 rows, 3 rows with a short last slice of 7): every group
    still gets the brute-force divisor, and the result equals the one-slice search exactly."""
    import auto_round.quant.opt_rtn as opt_rtn

    torch.manual_seed(5)
    grouped = torch.randn(7, 2, 16) * torch.rand(7, 1, 1)
    importance = torch.rand(7, 2, 16) * 4
    wmin, wmax = group_range(grouped)
    whole = search_sym_clip_factor(grouped, 3, importance, wmin, wmax)
    monkeypatch.setattr(opt_rtn, "SEARCH_SLICE_ELEMENTS", slice_elements)
    sliced = search_sym_clip_factor(grouped, 3, importance, wmin, wmax)
    assert torch.equal(sliced, whole)
    for r in range(7):
        for g in range(2):
            d = brute_force_divisor(grouped[r, g].tolist(), importance[r, g].tolist(), 3)
            assert 4 / sliced[r, g].item() == pytest.approx(d, rel=1e-6)


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 128), (4, -1)])
def test_search_never_worse_than_rtn_on_the_weighted_error(bits, group_size):
    torch.manual_seed(0)
    weight = torch.randn(32, 200) * torch.linspace(0.1, 3, 200)  # uneven channels: importance matters
    layout = GroupLayout(32, 200, group_size)
    grouped = layout.to_groups(weight)
    importance = layout.to_groups(torch.rand(200).pow(4).expand(32, 200).contiguous())
    wmin, wmax = group_range(grouped)
    factor = search_sym_clip_factor(grouped, bits, importance, wmin, wmax)
    tuned = qdq_int(grouped, bits, True, alpha=factor, beta=factor, wmin=wmin, wmax=wmax).weight
    plain = layout.to_groups(quantize_weight_rtn(weight, bits, group_size, True)[0])
    err_tuned, err_plain = weighted_error(grouped, tuned, importance), weighted_error(grouped, plain, importance)
    assert (err_tuned <= err_plain * (1 + 1e-5) + 1e-12).all()
    assert err_tuned.sum() < 0.97 * err_plain.sum()  # and clearly better overall


def test_fill_importance_rules():
    w = torch.tensor([[[1.0, -2.0, 3.0, 4.0]]])
    imp = torch.tensor([[[2.0, 0.0, 4.0, 0.0]]])  # half zero: filled with the mean of the nonzero (3)
    assert fill_importance(imp, w, 4).tolist() == [[[2.0, 3.0, 4.0, 3.0]]]
    sparse = torch.tensor([[[0.0, 0.0, 5.0, 0.0]]])  # more than half zero: |w| for <= 3 bits
    assert fill_importance(sparse, w, 3).tolist() == [[[1.0, 2.0, 3.0, 4.0]]]
    rms = w.pow(2).mean().sqrt()
    torch.testing.assert_close(fill_importance(sparse, w, 4), w.abs() + rms)


def test_iters0_uses_opt_rtn_with_data_and_plain_rtn_when_disabled(caplog):
    ids = random_ids(8, 32)
    opt = AutoRound(tiny_model("llama"), dataset=ids, nsamples=8, seqlen=32, iters=0, group_size=32)
    with caplog.at_level(logging.INFO, logger="auto_round"):
        opt.quantize()
    assert any("opt-RTN" in r.message for r in caplog.records)
    plain = AutoRound(tiny_model("llama"), dataset=ids, nsamples=8, seqlen=32, iters=0, group_size=32,
                      disable_opt_rtn=True)
    plain.quantize()
    name = "model.layers.0.mlp.down_proj"
    original = tiny_model("llama").get_submodule(name).weight
    expected = quantize_weight_rtn(original, 4, 32, True)[0]
    assert torch.equal(plain.model.get_submodule(name).weight, expected)
    assert not torch.equal(opt.model.get_submodule(name).weight, expected)


def test_opt_rtn_without_data_falls_back_or_errors():
    model = tiny_model("llama")
    AutoRound(model, iters=0).quantize()  # default: warns and rounds to nearest
    with pytest.raises(ValueError, match="needs calibration data"):
        AutoRound(tiny_model("llama"), iters=0, disable_opt_rtn=False).quantize()


def test_cli_rtn_recipe_disables_opt_rtn():
    from auto_round.cli.main import RECIPES

    assert RECIPES["rtn"]["disable_opt_rtn"] is True
