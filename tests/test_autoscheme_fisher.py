"""AutoScheme's Fisher scores (model/autoscheme_fisher.py) against a whole-model, per-sample reference."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from auto_round import AutoRound, AutoScheme
from auto_round.algorithms.act_quant import needs_act_calibration
from auto_round.algorithms.autoscheme import AutoSchemeError
from auto_round.algorithms.signround import make_tunable
from auto_round.layers import layer_weight
from auto_round.model.autoscheme_fisher import fisher_scores
from auto_round.model.blocks import find_block_groups, iter_blocks, quantizable_layers
from auto_round.quant.act_qdq import qdq_act
from auto_round.schemes import get_scheme
from tiny_models import CONFIGS, random_ids, tiny_model


def _frozen_model():
    model = tiny_model("llama").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _full_model_fisher(model, layers, ids):
    """Reference, written out: for each sample a whole-model backward of its share of the token-mean
    cross-entropy at the fp weights (weights and layer inputs as leaves of one graph); F = sum of squared
    weight grads; score = 1/2 F (W - W_hat)^2 + 1/2 sum g_x^2 (x - x_hat)^2 for act-quantized options,
    a static option's x_hat with the max |x| over all samples."""
    n_tokens = ids.shape[0] * (ids.shape[1] - 1)
    fisher = {n: torch.zeros_like(layer_weight(m)) for n, (m, _) in layers.items()}
    seen = {n: [] for n in layers}  # (x, dL_s/dx) per sample
    for s in range(ids.shape[0]):
        leaves, inputs = {}, {}
        for n, (m, _) in layers.items():
            leaves[n] = layer_weight(m).detach().clone().requires_grad_(True)

            def fwd(x, n=n, m=m):
                x.retain_grad()
                inputs[n] = x
                return F.linear(x, leaves[n], m.bias)
            m.forward = fwd
        with torch.enable_grad():
            h = model.get_input_embeddings()(ids[s:s + 1]).detach().requires_grad_(True)
            logits = model(inputs_embeds=h).logits[0, :-1].float()
            (F.cross_entropy(logits, ids[s, 1:], reduction="sum") / n_tokens).backward()
        for n, (m, sch) in layers.items():
            del m.forward
            fisher[n] += leaves[n].grad.pow(2)
            seen[n].append((inputs[n].detach(), inputs[n].grad))
    scores = {}
    for n, (m, sch) in layers.items():
        w_hat = make_tunable(m, sch, scale_dtype=torch.float16, enable_minmax_tuning=False,
                             device="cpu").qdq_weight().detach()
        scores[n] = 0.5 * float((fisher[n] * (layer_weight(m) - w_hat).pow(2)).sum())
        if sch.quantizes_activations:
            act_max = max(float(x.abs().max()) for x, _ in seen[n]) if needs_act_calibration(sch) else None
            for x, g in seen[n]:
                xq = qdq_act(x, sch.resolved_act_data_type, sch.act_bits, sch.resolved_act_group_size,
                             sym=sch.resolved_act_sym, act_max=None if act_max is None else torch.tensor(act_max))
                scores[n] += 0.5 * float((g.pow(2) * (x - xq).pow(2)).sum())
    return scores


@pytest.mark.parametrize("options", [["W2A16G64", "W4A16G64"], ["MXFP4"], ["FP8_STATIC"]])
def test_blockwise_fisher_equals_full_model_per_sample(options):
    model = _frozen_model()
    ids = random_ids(3, 16)
    blocks = list(iter_blocks(model, ["model.layers"]))
    names = [n for n, _ in model.named_modules() if n.startswith("model.layers.") and n.endswith("proj")]
    opts = [{n: (model.get_submodule(n), get_scheme(o)) for n in names} for o in options]
    got = fisher_scores(model, blocks, opts, ids, torch.ones_like(ids), batch_size=2)
    for k, layers in enumerate(opts):
        want = _full_model_fisher(model, layers, ids)
        for n in names:
            assert got[k][n] == pytest.approx(want[n], rel=2e-3, abs=1e-12)
    if len(options) == 2:
        assert all(got[1][n] < got[0][n] for n in names)  # 4 bits disturb the loss less than 2 bits


def test_lm_head_static_option_uses_the_calibration_max():
    """lm_head's FP8_STATIC option is scored with the max |input| over all samples, as the run calibrates it
    (model/tail_inputs.py), not each sample's own: it equals the whole-model reference."""
    model = _frozen_model()
    assert not model.config.tie_word_embeddings
    ids = random_ids(4, 16, seed=5)
    blocks = list(iter_blocks(model, ["model.layers"]))
    names = ["model.layers.1.mlp.down_proj", "lm_head"]
    opts = [{n: (model.get_submodule(n), get_scheme("FP8_STATIC")) for n in names}]
    got = fisher_scores(model, blocks, opts, ids, torch.ones_like(ids), batch_size=3)
    want = _full_model_fisher(model, opts[0], ids)
    for n in names:
        assert got[0][n] == pytest.approx(want[n], rel=2e-3, abs=1e-12)


def test_fisher_plan_end_to_end(tmp_path):
    ar = AutoRound(tiny_model("llama"), scheme=AutoScheme(3.0, ["W2A16G64", "W4A16G64"], nsamples=4, seqlen=16,
                                                          score="fisher"),
                   iters=0, dataset=random_ids(8, 16), low_cpu_mem_usage=False)
    ar.quantize_and_save(tmp_path / "out")
    plan = json.loads((tmp_path / "out" / "autoscheme_plan.json").read_text())["plans"][0]
    assert plan["total_bits"] <= plan["budget_bits"]
    assert {v["bits"] for v in plan["layers"].values()} == {2, 4}
    assert plan["score"] == "fisher"


def test_unknown_score_is_refused():
    with pytest.raises(AutoSchemeError, match="score must be one of fisher, delta_loss"):
        AutoScheme(3.0, "W2A16G64,W4A16G64", score="hessian")


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_fisher_scores_on_every_architecture(arch):
    """Every tiny architecture (Conv1D GPT-2, OPT, NeoX, Gemma3 ...) scores each block layer, 4 bits below
    2 bits, with the whole-model reference agreeing on one of its layers."""
    model = tiny_model(arch)
    for p in model.parameters():
        p.requires_grad_(False)
    group = find_block_groups(model)[0]
    layers = quantizable_layers(model.get_submodule(group), prefix=group)
    opts = [{n: (m, get_scheme(o)) for n, m in layers.items()} for o in ("W2A16G32", "W4A16G32")]
    ids = random_ids(2, 16)
    got = fisher_scores(model, list(iter_blocks(model, [group])), opts, ids, torch.ones_like(ids), batch_size=2)
    assert all(0 < got[1][n] < got[0][n] for n in layers)
    first = next(iter(layers))
    want = _full_model_fisher(model, {first: opts[0][first]}, ids)
    assert got[0][first] == pytest.approx(want[first], rel=2e-3)
