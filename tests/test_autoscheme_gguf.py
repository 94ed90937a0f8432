"""AutoScheme with GGUF options: one ggml type per block layer under the budget, written as one GGUF file.

The cost model is checked against what the file really stores (gguf-py's reader: bytes per tensor), the
types against the plan, and the file against transformers' GGUF loader (the fake-quantized weights bit
for bit, as tests/test_gguf_e2e.py does for the fixed mixes).
"""

import json

import gguf
import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from auto_round import AutoRound, AutoScheme
from auto_round.algorithms.autoscheme import AutoSchemeError, layer_bits
from auto_round.export.writer import ExportError
from auto_round.model.gguf_mix import LEAF_KIND
from auto_round.quant.gguf.types import GGML_TYPES
from auto_round.schemes import gguf_scheme
from test_gguf_e2e import WIDE, assert_same_model
from tiny_models import random_ids, saved_tiny_model, tiny_model, tiny_tokenizer, word_text_file

OPTIONS = "gguf:q2_k_s,gguf:q4_k_m"


def mixed_rows_model(seed: int = 0) -> torch.nn.Module:
    """hidden 256 (k-quant rows) and intermediate 320: ffn_down's rows of 320 fall back (q2_k -> q4_0, q4_k -> q5_0)."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(**{**WIDE, "intermediate_size": 320}, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def quantize(tmp_path, model, fmt="gguf:q2_k_s", target=3.6, **kw):
    ar = AutoRound(model, tiny_tokenizer(), scheme=AutoScheme(target, OPTIONS, nsamples=4, seqlen=16), dataset=random_ids(8, 16),
                   nsamples=8, seqlen=16, batch_size=4, low_cpu_mem_usage=False, **{"iters": 0, **kw})
    out = tmp_path / "out"
    ar.quantize_and_save(out, format=fmt)
    files = list(out.glob("*.gguf"))
    assert len(files) == 1, files
    return ar, out, files[0]


def gguf_name(hf_name: str) -> str:
    """'model.layers.1.mlp.down_proj' -> 'blk.1.ffn_down.weight'; 'lm_head' -> 'output.weight'."""
    if hf_name == "lm_head":
        return "output.weight"
    parts = hf_name.split(".")
    return f"blk.{parts[2]}.{LEAF_KIND[parts[-1]]}.weight"


def test_ggml_block_sizes_match_gguf_py():
    for name, t in GGML_TYPES.items():
        assert (t.block, t.type_size) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]], name
        assert layer_bits(gguf_scheme(name), 3, 2 * t.block) == 3 * 2 * t.type_size * 8
        assert layer_bits(gguf_scheme(name), 3, 2 * t.block, ignore_scale_zp_bits=True) == 3 * 2 * t.block * t.bits
    with pytest.raises(ValueError, match="fall"):
        layer_bits(gguf_scheme("q2_k"), 4, 320)


def test_options_parse_to_ggml_types_and_mixes():
    auto = AutoScheme(3.0, "gguf:q2_k_s, gguf:q4_k_s, GGUF:Q4_K_M")
    assert auto.is_gguf and auto.labels == ("GGUF:Q2_K_S", "GGUF:Q4_K_S")  # q4_k_m has q4_k_s's base type
    assert [s.gguf for s in auto.schemes] == ["q2_k", "q4_k"] and auto.mixes == ("q2_k_s", "q4_k_s")
    assert auto.share_fused_layers is False  # llama.cpp keeps q/k/v, gate/up separate
    assert AutoScheme(3.0, "W2A16G64,W4A16G64").share_fused_layers is True
    assert AutoScheme(3.0, OPTIONS, share_fused_layers=True).share_fused_layers is True
    assert AutoScheme(3.0, [gguf_scheme("q3_k"), "gguf:q6_k"]).mixes == ("q3_k_s", "q6_k")
    with pytest.raises(AutoSchemeError, match="mix GGUF types with other schemes"):
        AutoScheme(3.0, ["W2A16G64", "gguf:q4_k_m"])
    with pytest.raises(AutoSchemeError, match="quantized ggml types"):
        AutoScheme(3.0, "gguf:q2_k_s,gguf:bf16")
    with pytest.raises(AutoSchemeError, match="not a valid scheme"):
        AutoScheme(3.0, "gguf:q2_k_s,gguf:q9_k")


@pytest.mark.parametrize("mode", [dict(), dict(iters=1)], ids=["opt-rtn", "tuned"])
def test_plan_is_the_file_and_reloads(tmp_path, mode):
    ar, out, path = quantize(tmp_path, mixed_rows_model(), **mode)
    plan = json.loads((out / "autoscheme_plan.json").read_text())["plans"][0]
    assert plan["total_bits"] <= plan["budget_bits"] and plan["achieved_avg_bits"] <= 3.6
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    types = {n: v["ggml_type"] for n, v in plan["layers"].items()}
    assert {"q2_k", "q4_k"} <= set(types.values()) <= {"q2_k", "q4_k", "q4_0", "q5_0"}  # a real mix
    for name, ggml_type in types.items():
        assert tensors[gguf_name(name)].tensor_type.name == ggml_type.upper(), name
        if name.endswith("down_proj"):  # rows of 320: llama.cpp's fallbacks of q2_k / q4_k
            assert ggml_type in ("q4_0", "q5_0")
    # the cost model is the bytes in the file: allocated layers plus lm_head, fixed at its mix's q6_k
    assert tensors["output.weight"].tensor_type.name == "Q6_K"
    stored = sum(int(tensors[gguf_name(n)].n_bytes) for n in [*types, "lm_head"])
    assert stored * 8 == plan["total_bits"]
    assert path.name.endswith("-Q2_K_S.gguf") and tensors["token_embd.weight"].tensor_type.name == "Q2_K"
    assert_same_model(ar, path)


def test_the_format_mix_gives_embedding_output_and_file_type(tmp_path):
    ar, out, path = quantize(tmp_path, mixed_rows_model(), fmt="gguf:q4_k_m", target=[4.0, 3.6])
    plans = json.loads((out / "autoscheme_plan.json").read_text())["plans"]
    assert [p["target_avg_bits"] for p in plans] == [4.0, 3.6]
    tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert path.name.endswith("-Q4_K_M.gguf") and tensors["token_embd.weight"] == "Q4_K"
    for name, entry in plans[0]["layers"].items():  # quantized with the first target's plan
        assert tensors[gguf_name(name)] == entry["ggml_type"].upper()


def test_wrong_formats_are_refused_before_the_scoring(tmp_path):
    ar = AutoRound(tiny_model("llama"), tiny_tokenizer(), scheme=AutoScheme(3.0, OPTIONS, nsamples=2, seqlen=16),
                   iters=0, dataset=random_ids(4, 16), low_cpu_mem_usage=False)
    with pytest.raises(ExportError, match="gguf"):
        ar.quantize_and_save(tmp_path / "a", format="auto_round")
    assert ar.auto_scheme_plans is None and not (tmp_path / "a").exists()
    ints = AutoRound(tiny_model("llama"), tiny_tokenizer(), scheme=AutoScheme(3.0, "W2A16G64,W4A16G64", nsamples=2,
                     seqlen=16), iters=0, dataset=random_ids(4, 16), low_cpu_mem_usage=False)
    with pytest.raises(ExportError, match="gguf:\\* options"):
        ints.quantize_and_save(tmp_path / "b", format="gguf:q4_k_m")
    assert ints.auto_scheme_plans is None and not (tmp_path / "b").exists()


def test_cli_gguf_options_write_a_gguf_file(tmp_path):
    from auto_round.cli.main import main

    src = saved_tiny_model(tmp_path / "src")
    text = word_text_file(tmp_path / "calib.txt")
    out = tmp_path / "cli"
    rc = main([str(src), "--schemes", "gguf:q4_0,gguf:q8_0", "--bits", "6", "--iters", "0", "--dataset", str(text),
               "--nsamples", "4", "--seqlen", "16", "--auto_scheme_nsamples", "2", "--auto_scheme_seqlen", "16",
               "--output_dir", str(out)])
    assert rc == 0
    path = next(out.glob("*.gguf"))
    assert path.name.endswith("-Q4_0.gguf")  # the first option's mix when --format is not given
    plan = json.loads((out / "autoscheme_plan.json").read_text())["plans"][0]
    assert plan["achieved_avg_bits"] <= 6.0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {types[gguf_name(n)] for n in plan["layers"]} == {"Q4_0", "Q8_0"}


@pytest.mark.parametrize("score", ["delta_loss", "fisher"])
def test_gguf_options_are_scored_as_opt_rtn_quantizes_them(monkeypatch, score):
    """With opt-RTN (the iters=0 default) the scoring searches the ggml types with the imatrix of the fp chain,
    the one the opt-RTN walk uses, so each layer's scored weight is the weight the run writes (the embedding
    kept in float so that both see the same block inputs)."""
    from auto_round.model import autoscheme_fisher, autoscheme_score

    ids = random_ids(4, 16)
    seen: dict = {}
    real_rtn = autoscheme_score._rtn_weights

    def spy(layers, device, scale_dtype, imatrix):
        out = real_rtn(layers, device, scale_dtype, imatrix)
        for n, (_, s) in layers.items():
            seen[(n, s.gguf)] = out[n]
        return out

    monkeypatch.setattr(autoscheme_score, "_rtn_weights", spy)
    monkeypatch.setattr(autoscheme_fisher, "_rtn_weights", spy)
    ar = AutoRound(mixed_rows_model(), tiny_tokenizer(), scheme=AutoScheme(3.6, OPTIONS, dataset=ids, nsamples=4,
                   seqlen=16, batch_size=2, score=score), iters=0, dataset=ids, nsamples=4, seqlen=16, batch_size=2,
                   fp_layers="embed_tokens", low_cpu_mem_usage=False)
    ar.quantize()
    plan = ar.auto_scheme_plans[0]
    assert len(plan.choice) == 14
    for name in plan.choice:
        written = ar.model.get_submodule(name).weight
        assert torch.equal(seen[(name, plan.layer_schemes[name].gguf)], written), name


def test_the_seeds_gguf_autoscheme_example_saves_a_gguf_file_without_a_format(tmp_path, monkeypatch):
    """The reference docs' example: AutoScheme over GGUF options, lm_head pinned by layer_config, iters=0, then
    quantize_and_save() with no format: the GGUF file of the plan (it was "'auto_round' cannot hold ggml layers")."""
    monkeypatch.chdir(tmp_path)
    scheme = AutoScheme(avg_bits=3, options=("GGUF:Q2_K_S", "GGUF:Q4_K_S"), ignore_scale_zp_bits=True, nsamples=4,
                        seqlen=16)
    ar = AutoRound(model=mixed_rows_model(), tokenizer=tiny_tokenizer(), scheme=scheme,
                   layer_config={"lm_head": "GGUF:Q6_K"}, iters=0, dataset=random_ids(8, 16), nsamples=8, seqlen=16)
    _, paths = ar.quantize_and_save()
    files = list((tmp_path / "tmp_autoround").glob("*.gguf"))
    assert paths == [tmp_path / "tmp_autoround"] and len(files) == 1
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(files[0]).tensors}
    assert types["output.weight"] == "Q6_K"
    assert {types[n] for n in types if n.startswith("blk.") and n.endswith("attn_q.weight")} <= {"Q2_K", "Q4_K"}


def test_a_gguf_preset_saves_its_gguf_file_and_other_schemes_auto_round_by_default(tmp_path):
    ar = AutoRound(tiny_model("llama"), tiny_tokenizer(), scheme="gguf:q4_0", iters=0)
    ar.quantize_and_save(tmp_path / "g")
    assert len(list((tmp_path / "g").glob("*.gguf"))) == 1
    ar = AutoRound(tiny_model("llama"), tiny_tokenizer(), scheme="W4A16G32", iters=0)
    ar.save_quantized(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["quant_method"] == "auto-round"
