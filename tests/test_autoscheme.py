"""AutoScheme: cost model, exact knapsack vs brute force, grouping, delta-loss scores, end to end."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from auto_round import AutoRound, AutoScheme
from auto_round.algorithms.autoscheme import AutoSchemeError, Item, build_groups, layer_bits, solve
from auto_round.algorithms.autoscheme.solver import InfeasibleBudget
from auto_round.export import ExportError
from auto_round.algorithms.signround import make_tunable
from auto_round.layers import layer_weight
from auto_round.model.autoscheme_score import delta_loss_scores
from auto_round.model.blocks import iter_blocks
from auto_round.schemes import get_scheme
from tiny_models import random_ids, tiny_model, tiny_tokenizer

OPTIONS = ["W2A16G64", "W4A16G64"]


# ------------------------------------------------------------------------------------------- cost model
def test_layer_bits_by_hand():
    w2, mx = get_scheme("W2A16G64"), get_scheme("MXFP4")
    assert layer_bits(w2, 64, 128) == 2 * 64 * 128 + 64 * 2 * (16 + 2)  # 2 groups per row, fp16 scale + 2-bit zp
    assert layer_bits(w2, 64, 128, ignore_scale_zp_bits=True) == 2 * 64 * 128
    assert layer_bits(mx, 64, 128) == 4 * 64 * 128 + 64 * 4 * 8  # E8M0 scale per 32, no zero point
    assert layer_bits(get_scheme("BF16"), 64, 128) == 16 * 64 * 128


# ------------------------------------------------------------------------------------------- solver
def _brute(items, budget):
    best = None
    for choice in itertools.product(*[range(len(it.costs)) for it in items]):
        bits = sum(it.costs[c] for it, c in zip(items, choice))
        loss = sum(it.losses[c] for it, c in zip(items, choice))
        if bits <= budget and (best is None or loss < best[0] - 1e-12):
            best = (loss, bits)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(150):
        n, k = rng.randint(1, 6), rng.randint(1, 3)
        items = [Item(str(i), tuple(rng.randint(1, 40) for _ in range(k)), tuple(rng.random() for _ in range(k)))
                 for i in range(n)]
        lo, hi = sum(min(i.costs) for i in items), sum(max(i.costs) for i in items)
        budget = rng.randint(lo, hi + 5)
        sol = solve(items, budget)
        want = _brute(items, budget)
        assert sol.total_bits <= budget
        assert sol.total_bits == sum(it.costs[c] for it, c in zip(items, sol.choice))
        assert sol.total_loss == pytest.approx(want[0], abs=1e-9)
        with pytest.raises(InfeasibleBudget):
            solve(items, lo - 1)


def test_groups_fused_experts_and_shared():
    names = [f"m.layers.{b}.{p}" for b in range(2) for p in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.experts.0.w1", "mlp.experts.1.w1", "mlp.experts.0.w2")]
    groups = build_groups(names, ["m.layers"], [("o_proj",)])
    as_sets = {frozenset(g) for g in groups}
    assert frozenset(names[0:3]) in as_sets and frozenset(names[7:10]) in as_sets
    assert frozenset(names[4:7]) in as_sets  # all experts of block 0 together
    assert frozenset([names[3]]) in as_sets  # o_proj shared per block: alone in each block
    assert sum(len(g) for g in groups) == len(names)
    with pytest.raises(AutoSchemeError, match="matches no layer"):
        build_groups(names, ["m.layers"], [("nothing_here",)])
    # share_fused=False: q/k/v stand alone, experts and user groups still hold
    loose = {frozenset(g) for g in build_groups(names, ["m.layers"], [("o_proj",)], share_fused=False)}
    assert all(frozenset([n]) in loose for n in names[0:3] + names[7:10])
    assert frozenset(names[4:7]) in loose and frozenset([names[3]]) in loose


# ------------------------------------------------------------------------------------------- scores
def _full_model_scores(model, layers, ids):
    """Reference: whole-model forward/backward with every layer's RTN weight substituted at once."""
    w_hat = {}
    for n, (m, s) in layers.items():
        w_hat[n] = make_tunable(m, s, scale_dtype=torch.float16, enable_minmax_tuning=False,
                                device="cpu").qdq_weight().detach().requires_grad_(True)
        m.forward = (lambda mm, w: lambda x: F.linear(x, w, mm.bias))(m, w_hat[n])
    with torch.enable_grad():
        model(input_ids=ids, labels=ids).loss.backward()
    for n, (m, _) in layers.items():
        del m.forward
    return {n: float((w_hat[n].grad * (layer_weight(m) - w_hat[n].detach())).abs().sum()) for n, (m, _) in layers.items()}


def test_blockwise_scores_equal_full_model_backward():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    ids = random_ids(4, 16)
    blocks = list(iter_blocks(model, ["model.layers"]))
    names = [n for n, _ in model.named_modules() if n.startswith("model.layers.") and n.endswith("proj")]
    opts = [{n: (model.get_submodule(n), get_scheme(o)) for n in names} for o in OPTIONS]
    got = delta_loss_scores(model, blocks, opts, ids, torch.ones_like(ids), batch_size=3)
    for k, layers in enumerate(opts):
        want = _full_model_scores(model, layers, ids)
        for n in names:
            assert got[k][n] == pytest.approx(want[n], rel=1e-3, abs=1e-9)
    for n in names:  # 4 bits disturb the loss less than 2 bits
        assert got[1][n] < got[0][n]


# ------------------------------------------------------------------------------------------- end to end
def _auto_round(tmp_path, target=3.0, **kw):
    ar = AutoRound(tiny_model("llama"), scheme=AutoScheme(target, OPTIONS, nsamples=4, seqlen=16, **kw), iters=0,
                   dataset=random_ids(8, 16), low_cpu_mem_usage=False)
    out = tmp_path / "out"
    ar.quantize_and_save(out)
    return ar, out


@pytest.mark.parametrize("ignore", [False, True])
def test_end_to_end_plan_export_and_reload(tmp_path, ignore):
    ar, out = _auto_round(tmp_path, ignore_scale_zp_bits=ignore)
    saved = json.loads((out / "autoscheme_plan.json").read_text())["plans"][0]
    assert saved["total_bits"] <= saved["budget_bits"] and saved["achieved_avg_bits"] <= 3.0
    bits = {n: v["bits"] for n, v in saved["layers"].items()}
    assert set(bits.values()) == {2, 4}  # a real mix at 3 bits
    assert saved["share_fused_layers"] is True
    for b in range(2):
        p = f"model.layers.{b}."
        assert bits[p + "self_attn.q_proj"] == bits[p + "self_attn.k_proj"] == bits[p + "self_attn.v_proj"]
        assert bits[p + "mlp.gate_proj"] == bits[p + "mlp.up_proj"]
    # the checkpoint: per-layer bits where they differ from the global scheme
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for n, b in bits.items():
        assert qc.get("extra_config", {}).get(n, {}).get("bits", qc["bits"]) == b
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(2, 12, seed=1)
    with torch.no_grad():
        fake, real = ar.model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert (fake - real).abs().max() <= 1e-4 * (1 + fake.abs().max())
    for n, b in bits.items():
        assert reloaded.get_submodule(n).bits == b


def test_unshared_fused_layers_plan_is_the_per_layer_optimum(tmp_path, caplog):
    """share_fused_layers=False: every layer is its own DP item, so the saved plan is the exact optimum of
    the saved scores with no groups (`solve` is checked against brute force above), and it reloads."""
    with pytest.raises(AutoSchemeError, match="share_fused_layers"):
        AutoScheme(3.0, OPTIONS, share_fused_layers="no")
    with caplog.at_level("WARNING", logger="auto_round"):
        ar, out = _auto_round(tmp_path, target=3.0, share_fused_layers=False)
    saved = json.loads((out / "autoscheme_plan.json").read_text())["plans"][0]
    names = list(saved["layers"])
    model = ar.model
    items = [Item(name=n, costs=tuple(layer_bits(get_scheme(o), *model.get_submodule(n).weight.shape) for o in OPTIONS),
                  losses=tuple(saved["layers"][n]["scores"])) for n in names]
    best = solve(items, saved["budget_bits"])
    assert [OPTIONS.index(saved["layers"][n]["option"]) for n in names] == list(best.choice)
    assert saved["total_bits"] <= saved["budget_bits"] and saved["groups"] == []
    assert saved["share_fused_layers"] is False
    split = [p for p in ("model.layers.0.self_attn.", "model.layers.1.self_attn.")
             if len({saved["layers"][p + x]["bits"] for x in ("q_proj", "k_proj", "v_proj")}) > 1]
    assert split, "on this (seeded) tiny model the ungrouped optimum splits q/k/v: the case under test"
    assert "fused groups got mixed options" in caplog.text
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(2, 12, seed=1)
    with torch.no_grad():
        fake, real = ar.model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert (fake - real).abs().max() <= 1e-4 * (1 + fake.abs().max())


def test_list_of_targets_gives_one_plan_each(tmp_path):
    ar, out = _auto_round(tmp_path, target=[2.5, 3.5])
    plans = json.loads((out / "autoscheme_plan.json").read_text())["plans"]
    assert [p["target_avg_bits"] for p in plans] == [2.5, 3.5]
    assert all(p["achieved_avg_bits"] <= p["target_avg_bits"] for p in plans)
    assert plans[0]["achieved_avg_bits"] < plans[1]["achieved_avg_bits"]
    assert ar.layer_schemes["model.layers.0.self_attn.q_proj"].bits == plans[0]["layers"][
        "model.layers.0.self_attn.q_proj"]["bits"]


def test_bad_inputs_are_typed_errors(tmp_path):
    with pytest.raises(AutoSchemeError, match="W9A16"):
        AutoScheme(3.0, "W2A16G64,W9A16")
    with pytest.raises(AutoSchemeError, match="at least one option"):
        AutoScheme(3.0, "")
    with pytest.raises(AutoSchemeError, match="GGUF"):
        AutoScheme(3.0, ["W2A16G64", "gguf:q4_k_m"])
    assert len(AutoScheme(3.0, "W4A16,w4a16, W2A16").schemes) == 2  # duplicates removed
    default = AutoScheme(3.0, OPTIONS, nsamples=None, seqlen=None)  # the reference's signature spells defaults None
    assert (default.nsamples, default.seqlen) == (16, 256)
    with pytest.raises(AutoSchemeError, match="nsamples must be a positive integer"):
        AutoScheme(3.0, OPTIONS, nsamples=0)
    # the reference's other arguments run unchanged; method names its only method
    AutoScheme(3.0, OPTIONS, method="default", low_gpu_mem_usage=True, low_cpu_mem_usage=True, device_map=None,
               enable_torch_compile=None)
    with pytest.raises(AutoSchemeError, match="method must be 'default'"):
        AutoScheme(3.0, OPTIONS, method="fast")
    with pytest.raises(AutoSchemeError, match=r"outside the achievable range \[2\.\d+, 4\.\d+\]"):
        _auto_round(tmp_path, target=5.0)
    assert not (tmp_path / "out").exists()
    with pytest.raises(AutoSchemeError, match="bits"):
        AutoRound(tiny_model("llama"), scheme=AutoScheme(3.0, OPTIONS), bits=4, dataset=random_ids(4, 16))


def test_cli_schemes_and_float_bits(tmp_path):
    from auto_round.cli.main import main

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    from tiny_models import tiny_tokenizer
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "cli"
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i}" for i in range(3000)))
    rc = main([str(src), "--schemes", "W2A16G64,W4A16G64", "--bits", "3.0", "--iters", "0", "--dataset", str(text),
               "--auto_scheme_nsamples", "2", "--auto_scheme_seqlen", "16", "--auto_scheme_score", "delta_loss",
               "--output_dir", str(out)])
    assert rc == 0
    plan = json.loads((out / "autoscheme_plan.json").read_text())["plans"][0]
    assert plan["achieved_avg_bits"] <= 3.0
    assert plan["score"] == "delta_loss"  # the flag reaches AutoScheme (the default is fisher)
    assert main([str(src), "--bits", "3.5", "--output_dir", str(tmp_path / "bad")]) == 2
    assert main([str(src), "--scheme", "W4A16", "--schemes", "W2A16,W4A16", "--bits", "3",
                 "--output_dir", str(tmp_path / "bad2")]) == 2


def test_taylor_score_by_hand_on_one_layer():
    """L = sum(c * y), y = x W_hat^T: dL/dW_hat = c^T x, so score = sum |c^T x * (W - W_hat)|."""
    from auto_round.model.autoscheme_score import _QdqLinear, _rtn_weights

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False).requires_grad_(False)
    x, c = torch.randn(5, 64), torch.randn(5, 32)
    scheme = get_scheme("W2A16G64")
    w_hat = _rtn_weights({"l": (lin, scheme)}, "cpu", torch.float16)["l"]
    patch = _QdqLinear(lin, scheme, w_hat, grad=True)
    (lin(x) * c).sum().backward()
    patch.remove()
    want = float(((c.T @ x) * (lin.weight - w_hat)).abs().sum())
    assert patch.weight_term() == pytest.approx(want, rel=1e-5)
    assert not torch.equal(w_hat, lin.weight)


def test_activation_term_adds_to_the_score():
    from auto_round.schemes import QuantScheme

    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    ids = random_ids(2, 16)
    blocks = list(iter_blocks(model, ["model.layers"]))
    names = [n for n, _ in model.named_modules() if n.startswith("model.layers.") and n.endswith("proj")]
    mx_w = QuantScheme(bits=4, group_size=32, data_type="mx_fp")  # MXFP4 weights, fp activations
    opts = [{n: (model.get_submodule(n), s) for n in names} for s in (mx_w, get_scheme("MXFP4"))]
    w_only, w_and_a = delta_loss_scores(model, blocks, opts, ids, torch.ones_like(ids), batch_size=2)
    assert sum(w_and_a.values()) > sum(w_only.values())
    assert all(v > 0 for v in w_and_a.values())


def test_plan_in_gptq_dynamic_and_compressed_tensors_groups(tmp_path):
    ar = AutoRound(tiny_model("llama"), scheme=AutoScheme(3.0, OPTIONS, nsamples=4, seqlen=16), iters=0,
                   dataset=random_ids(8, 16))
    ar.quantize_and_save(tmp_path, format="auto_gptq,llm_compressor")
    plan = json.loads((tmp_path / "auto-gptq" / "autoscheme_plan.json").read_text())["plans"][0]
    bits = {n: v["bits"] for n, v in plan["layers"].items()}
    gptq = json.loads((tmp_path / "auto-gptq" / "config.json").read_text())["quantization_config"]
    for n, b in bits.items():
        key = "+:^" + n.replace(".", "\\.") + "$"
        assert gptq.get("dynamic", {}).get(key, {}).get("bits", gptq["bits"]) == b
    ct = json.loads((tmp_path / "llm-compressor" / "config.json").read_text())["quantization_config"]
    assert ct["format"] == "mixed-precision"
    assert {g["weights"]["num_bits"] for g in ct["config_groups"].values()} == set(bits.values())
    for g in ct["config_groups"].values():  # every layer of a group has the group's bits
        for target in g["targets"]:
            names = [n for n in bits if n == target or target.startswith("re:") and __import__("re").match(target[3:], n)]
            assert all(bits[n] == g["weights"]["num_bits"] for n in names)


def test_options_that_cannot_share_a_checkpoint_are_refused_before_the_scoring(tmp_path, monkeypatch):
    """NVFP4 and FP8_STATIC each fit auto_round, but one auto_round checkpoint holds one packing: the mix is
    refused before the scoring runs, with no output left; llm_compressor (a group per scheme) takes it."""
    from auto_round import compressor_autoscheme

    def no_scoring(*args, **kwargs):
        raise AssertionError("the scoring ran")

    monkeypatch.setattr(compressor_autoscheme, "fisher_scores", no_scoring)
    ar = AutoRound(tiny_model("llama"), scheme=AutoScheme(6.5, "NVFP4,FP8_STATIC", nsamples=4, seqlen=16), iters=0,
                   dataset=random_ids(8, 16))
    with pytest.raises(ExportError, match="NVFP4, FP8_STATIC cannot be mixed in one 'auto_round' checkpoint"):
        ar.quantize_and_save(tmp_path / "out", format="auto_round")
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    ar.quantize_and_save(tmp_path / "ct", format="llm_compressor")
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2


def test_an_option_the_format_cannot_hold_is_named_by_its_label(tmp_path, monkeypatch):
    """W4A16's 128-groups do not fit the tiny llama's 64-wide layers in llm_compressor: the error names the
    option as the user wrote it (not a QuantScheme repr) and the layer, before the scoring runs."""
    from auto_round import compressor_autoscheme

    monkeypatch.setattr(compressor_autoscheme, "fisher_scores", lambda *a, **k: pytest.fail("the scoring ran"))
    ar = AutoRound(tiny_model("llama"), scheme=AutoScheme(6.0, "W4A16,W8A16G32", nsamples=4, seqlen=16), iters=0,
                   dataset=random_ids(8, 16))
    with pytest.raises(ExportError) as err:
        ar.quantize_and_save(tmp_path / "out", format="llm_compressor")
    message = str(err.value)
    assert message.startswith("AutoScheme option W4A16 cannot be written as 'llm_compressor'") and "QuantScheme(" not in message
    assert "in_features=64 is not divisible by group_size=128" in message
    assert not (tmp_path / "out").exists()


def test_a_layer_no_option_fits_is_named_when_the_target_is_out_of_range(tmp_path):
    """quant_lm_head on the tiny llama: lm_head [260, 64] is not a multiple of 32, so it stays in fp under both
    options and its 16 bits lift the lowest achievable average above the target; the error says which layer
    and how much of the weights it holds, and nothing is written."""
    ar = AutoRound(tiny_model("llama"), tiny_tokenizer(), scheme=AutoScheme(3.0, "W2A16G32,W4A16G32", nsamples=4, seqlen=16),
                   iters=0, dataset=random_ids(8, 16), quant_lm_head=True)
    with pytest.raises(AutoSchemeError) as err:
        ar.quantize_and_save(tmp_path / "out", format="fake")
    lm_head = 260 * 64
    blocks = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    assert "stay in fp and count 16 bits: lm_head" in str(err.value)
    assert f"({lm_head / (lm_head + blocks):.1%} of the weights)" in str(err.value)
    assert not (tmp_path / "out").exists()
