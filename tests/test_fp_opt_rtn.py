"""Opt-RTN scale searches for MX and NVFP4: never worse than RTN on the importance-weighted error, strictly
better on constructed cases, candidate grids as documented, result reproducible through init_scale."""

import pytest
import torch

from auto_round.quant.fp_opt_rtn import (MX_CANDIDATES, NVFP4_CANDIDATES, importance_to_groups, search_mx_scale,
                                         search_nvfp4_scale, weighted_sse)
from auto_round.quant.int_qdq import GroupLayout
from auto_round.quant.mx_qdq import MX_FORMATS, qdq_mx
from auto_round.quant.nvfp_qdq import qdq_nvfp4


def random_case(group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 128, generator=gen) * torch.exp2(torch.randn(16, 1, generator=gen))
    imatrix = torch.rand(128, generator=gen) ** 4 * 10  # skewed per-in-feature importance
    layout = GroupLayout(16, 128, group)
    return layout.to_groups(w), importance_to_groups(imatrix, layout), imatrix, layout


def test_candidate_grids():
    assert MX_CANDIDATES == (1.0, 0.5, 2.0)
    assert len(NVFP4_CANDIDATES) == 102 and NVFP4_CANDIDATES[0] == 1.0 - 0.5 and NVFP4_CANDIDATES[-1] == 1.51
    assert 1.0 in NVFP4_CANDIDATES
    assert all(abs(b - a - 0.01) < 1e-9 for a, b in zip(NVFP4_CANDIDATES, NVFP4_CANDIDATES[1:]))


def test_importance_to_groups():
    layout = GroupLayout(2, 40, 32)  # ragged: the padded tail gets importance 0 (its weight is 0 anyway)
    g = importance_to_groups(torch.arange(40.0), layout)
    assert g.shape == (2, 2, 32) and g[1, 0, 3].item() == 3.0 and g[0, 1, 7].item() == 39.0
    assert (g[:, 1, 8:] == 0).all()


@pytest.mark.parametrize("name, rule", [("mx_fp4", "floor"), ("mx_fp4", "rceil"), ("mx_fp8", "floor"),
                                        ("mx_int4", "floor")])
def test_mx_search_never_worse_than_rtn(name, rule):
    grouped, imp, _, _ = random_case(32)
    fmt = MX_FORMATS[name]
    c = search_mx_scale(grouped, fmt, imp, rule=rule)
    assert set(c.unique().tolist()) <= {0.5, 1.0, 2.0}
    searched = qdq_mx(grouped, fmt, init_scale=c, rule=rule).weight
    rtn = qdq_mx(grouped, fmt, rule=rule).weight
    err_s, err_r = weighted_sse(searched, grouped, imp), weighted_sse(rtn, grouped, imp)
    assert (err_s <= err_r).all()
    if name == "mx_fp4":
        assert err_s.sum() < err_r.sum()  # some block improves on random data


def test_mx_search_constructed_case():
    # amax 7.6 under the floor rule: scale 1, 7.6 saturates to 6 (error 1.6). With c = 2: scale 2, 7.6/2 = 3.8
    # -> 4 -> 8 (error 0.4); the 0.3 entries go from 0.5 (error 0.2) to 0 (error 0.3). Weighted by 100 on the
    # big entry: RTN 100*2.56 + 31*0.04 = 257.2, c = 2: 100*0.16 + 31*0.09 = 18.8, c = 0.5: far worse.
    w = torch.full((1, 1, 32), 0.3)
    w[0, 0, 0] = 7.6
    imp = torch.ones_like(w)
    imp[0, 0, 0] = 100.0
    fmt = MX_FORMATS["mx_fp4"]
    c = search_mx_scale(w, fmt, imp)
    assert c.item() == 2.0
    err_s = weighted_sse(qdq_mx(w, fmt, init_scale=c).weight, w, imp).item()
    err_r = weighted_sse(qdq_mx(w, fmt).weight, w, imp).item()
    assert err_r == pytest.approx(257.24, rel=1e-5) and err_s == pytest.approx(18.79, rel=1e-5)


def test_mx_search_keeps_rtn_on_ties():
    w = torch.zeros(2, 3, 32)
    assert (search_mx_scale(w, MX_FORMATS["mx_fp4"], torch.ones_like(w)) == 1.0).all()


def test_nvfp4_search_never_worse_than_rtn():
    grouped, imp, _, _ = random_case(16, seed=1)
    c = search_nvfp4_scale(grouped, imp)
    assert ((c >= 0.5) & (c <= 1.51)).all()
    err_s = weighted_sse(qdq_nvfp4(grouped, init_scale=c).weight, grouped, imp)
    err_r = weighted_sse(qdq_nvfp4(grouped).weight, grouped, imp)
    assert (err_s <= err_r).all() and err_s.sum() < err_r.sum()
    assert (c != 1.0).any()


def test_nvfp4_search_constructed_case():
    # g = 1: s_b = e4m3(c * 6 / 6). RTN (c = 1, s = 1): the fifteen 5.0 entries tie between 4 and 6 and go to
    # 4: error 15. c = 1.25 gives s = 1.25: 5/1.25 = 4 exact, 6/1.25 = 4.8 -> 4 -> 5 (error 1): total 1.
    w = torch.full((1, 1, 16), 5.0)
    w[0, 0, 0] = 6.0
    imp = torch.ones_like(w)
    g = torch.tensor([1.0])
    c = search_nvfp4_scale(w, imp, gscale=g)
    err_s = weighted_sse(qdq_nvfp4(w, gscale=g, init_scale=c).weight, w, imp).item()
    err_r = weighted_sse(qdq_nvfp4(w, gscale=g).weight, w, imp).item()
    assert err_r == 15.0 and err_s <= 1.0 and c.item() != 1.0


def test_importance_changes_the_choice():
    # the same block, once weighting the big entry and once the small ones: the searches disagree
    w = torch.full((1, 1, 32), 0.3)
    w[0, 0, 0] = 7.6
    heavy_big, heavy_small = torch.ones_like(w), torch.full_like(w, 100.0)
    heavy_big[0, 0, 0] = 100.0
    heavy_small[0, 0, 0] = 1.0
    fmt = MX_FORMATS["mx_fp4"]
    assert search_mx_scale(w, fmt, heavy_big).item() == 2.0
    assert search_mx_scale(w, fmt, heavy_small).item() == 0.5  # scale 0.5: 0.3 -> 0.6 -> 0.5 -> 0.25


def test_nvfp4_search_equals_the_brute_force_search():
    """The search skips groups whose E4M3 block scale did not change between candidates; it must pick what
    trying every candidate on every group with the qdq itself picks."""
    from auto_round.quant.fp_opt_rtn import NVFP4_CANDIDATES, search_nvfp4_scale, weighted_sse
    from auto_round.quant.nvfp_qdq import global_scale, qdq_nvfp4

    gen = torch.Generator().manual_seed(3)
    grouped = torch.randn(24, 12, 16, generator=gen) * torch.rand(24, 12, 1, generator=gen) * 3
    importance = torch.rand(1, 12, 16, generator=gen).expand_as(grouped)
    g = global_scale(grouped)
    best_c = torch.full(grouped.shape[:-1], NVFP4_CANDIDATES[0])
    best_err = weighted_sse(qdq_nvfp4(grouped, gscale=g, init_scale=best_c).weight, grouped, importance)
    for c in NVFP4_CANDIDATES[1:]:
        cand = torch.full_like(best_c, c)
        err = weighted_sse(qdq_nvfp4(grouped, gscale=g, init_scale=cand).weight, grouped, importance)
        best_c, best_err = torch.where(err < best_err, cand, best_c), torch.minimum(err, best_err)
    assert torch.equal(search_nvfp4_scale(grouped, importance, gscale=g), best_c)
