"""quantize with a gguf:* preset -> one .gguf file -> transformers' GGUF loader -> the fake-quantized model.

transformers dequantizes every tensor with gguf-py and undoes llama.cpp's q/k row permutation, so the
reloaded fp32 weights must equal our fake-quantized weights bit for bit, and the logits agree to float
rounding (|diff| <= 1e-4 * (1 + max|logit|)).
"""

import logging

import gguf
import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from auto_round import AutoRound
from auto_round.export.writer import ExportError
from tiny_models import random_ids, tiny_model, tiny_tokenizer

# hidden 256 / intermediate 512: rows that k-quants (256 per super-block) can hold
WIDE = dict(vocab_size=260, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=256, eos_token_id=256, pad_token_id=257)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**WIDE, tie_word_embeddings=False),
    # head_dim 128 != hidden / heads: transformers' GGUF loader keeps Qwen3's default 128 (it maps no head_dim key)
    "qwen3": lambda: tf.Qwen3Config(**WIDE, head_dim=128, tie_word_embeddings=True),
    "mistral": lambda: tf.MistralConfig(**WIDE),
    # 6 layers: the default pattern (5 sliding, 1 full) that transformers' GGUF loader rebuilds
    "gemma3": lambda: tf.Gemma3TextConfig(**{**WIDE, "num_hidden_layers": 6}, head_dim=64, sliding_window=8),
    "qwen2": lambda: tf.Qwen2Config(**WIDE),
    # fused qkv_proj / gate_up_proj (llama.cpp's attn_qkv / ffn_up as they are)
    "phi3": lambda: tf.Phi3Config(**WIDE),
    # sliding window 8 < the 12 test tokens on even layers, attention and final softcapping; head_dim and
    # query_pre_attn_scalar 256, softcapping 50 / 30: the defaults, which transformers' GGUF loader assumes (it maps
    # none of query_pre_attn_scalar and the softcapping keys; llama.cpp reads the softcapping)
    "gemma2": lambda: tf.Gemma2Config(**WIDE, sliding_window=8),
    # LayerNorm with biases and biased projections; StableLM's partial rotary (a quarter of each head)
    "starcoder2": lambda: tf.Starcoder2Config(**WIDE),
    "stablelm": lambda: tf.StableLmConfig(**WIDE),
}


def wide_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.float32).eval()


def quantize_to_gguf(tmp_path, model, fmt, **kw):
    ar = AutoRound(model, tiny_tokenizer(), scheme=fmt, dataset=random_ids(8, 16), nsamples=8, seqlen=16,
                   batch_size=4, low_cpu_mem_usage=False, **{"iters": 0, "disable_opt_rtn": True, **kw})
    out = tmp_path / fmt.replace(":", "-")
    ar.quantize_and_save(out, format=fmt)
    files = list(out.glob("*.gguf"))
    assert len(files) == 1, f"expected one .gguf file, got {files}"
    return ar, files[0]


def reload(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def assert_same_model(ar, path) -> None:
    reloaded = reload(path)
    fake = dict(ar.model.named_parameters())
    mismatched = [n for n, p in reloaded.named_parameters() if n in fake and not torch.equal(p, fake[n])]
    assert not mismatched, f"weights differ after the GGUF round trip: {mismatched[:5]}"
    ids = random_ids(2, 12, seed=1)
    with torch.no_grad():
        a, b = ar.model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    tol = 1e-4 * (1 + a.abs().max().item())
    assert (a - b).abs().max().item() <= tol


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("mode", [dict(), dict(disable_opt_rtn=False), dict(iters=2)], ids=["rtn", "opt-rtn", "tuned"])
def test_q4_k_m_llama_round_trip(tmp_path, mode):
    ar, path = quantize_to_gguf(tmp_path, wide_model("llama"), "gguf:q4_k_m", **mode)
    assert path.name.endswith("-Q4_K_M.gguf")
    types = tensor_types(path)
    # 2 layers: use_more_bits(i, 2) holds for both (i >= 7*2/8 = 1, or i < 2/8 = 0 ... layer 0: (0-0)%3 != 2)
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["token_embd.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K" and types["blk.1.attn_v.weight"] == "Q6_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert_same_model(ar, path)
    for stats in ar.block_stats.values():  # tuned: iteration 0 is opt-RTN, the best iteration is kept
        assert stats.loss_best <= stats.loss_first


def test_tuning_starts_from_the_opt_rtn_scales():
    """Iteration 0 of the GGUF tuning (V = 0) is exactly opt-RTN: same searched scales, same codes."""
    from auto_round.algorithms.gguf import GGUFTunableLayer, gguf_quantize_module
    from auto_round.schemes import gguf_scheme

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 64, bias=False).requires_grad_(False)
    twin = torch.nn.Linear(256, 64, bias=False).requires_grad_(False)
    twin.weight.copy_(layer.weight)
    imatrix = torch.rand(256) * 10
    tuned = GGUFTunableLayer(layer, gguf_scheme("q4_k"), imatrix=imatrix).finalize()
    opt = gguf_quantize_module(twin, gguf_scheme("q4_k"), imatrix)
    assert torch.equal(tuned.codes, opt.codes) and torch.equal(tuned.params.scale, opt.params.scale)


@pytest.mark.parametrize("mix", ["q2_k_s", "q3_k_m", "q5_k_s", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_every_mix_reloads_exactly(tmp_path, mix):
    ar, path = quantize_to_gguf(tmp_path, wide_model("llama"), f"gguf:{mix}")
    assert path.name.endswith(f"-{mix.upper()}.gguf")
    assert_same_model(ar, path)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "mistral", "qwen2", "phi3", "gemma2", "starcoder2", "stablelm"])
def test_architectures_reload_with_matching_logits(tmp_path, arch):
    ar, path = quantize_to_gguf(tmp_path, wide_model(arch), "gguf:q4_k_m")
    assert_same_model(ar, path)


def test_tied_embedding_gets_the_output_type(tmp_path):
    ar, path = quantize_to_gguf(tmp_path, wide_model("qwen3"), "gguf:q4_k_m")
    types = tensor_types(path)
    assert "output.weight" not in types and types["token_embd.weight"] == "Q6_K"


def test_float_mix_writes_bf16(tmp_path):
    model = wide_model("llama")
    ar, path = quantize_to_gguf(tmp_path, model, "gguf:bf16")
    types = tensor_types(path)
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"


def test_format_alone_picks_the_gguf_scheme(tmp_path):
    ar = AutoRound(wide_model("llama"), tiny_tokenizer(), iters=0, disable_opt_rtn=True, low_cpu_mem_usage=False)
    out = tmp_path / "fmt"
    ar.quantize_and_save(out, format="gguf:q8_0")
    assert ar.layer_schemes["model.layers.0.self_attn.q_proj"].gguf == "q8_0"
    assert_same_model(ar, next(out.glob("*.gguf")))


def test_format_over_an_explicit_scheme_warns(tmp_path, caplog):
    """A gguf:* format decides the tensor types; a scheme the user chose (not the default W4A16) that it
    replaces is named in a warning, the default is replaced silently."""
    for scheme, warned in (("W2A16", True), ("W4A16", False)):
        ar = AutoRound(wide_model("llama"), tiny_tokenizer(), scheme=scheme, iters=0, disable_opt_rtn=True,
                       low_cpu_mem_usage=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="auto_round"):
            ar.quantize_and_save(tmp_path / scheme, format="gguf:q8_0")
        replaced = [r.getMessage() for r in caplog.records if "not the scheme" in r.getMessage()]
        assert len(replaced) == warned
        if warned:
            assert "int2_g128" in replaced[0] and "q8_0" in replaced[0]
        assert ar.layer_schemes["model.layers.0.self_attn.q_proj"].gguf == "q8_0"


def test_immediate_packing_gives_the_same_file(tmp_path):
    files = []
    for low_mem in (False, True):
        ar = AutoRound(wide_model("llama"), tiny_tokenizer(), scheme="gguf:q4_k_s", iters=0, disable_opt_rtn=True,
                       low_cpu_mem_usage=low_mem)
        out = tmp_path / f"low{low_mem}"
        ar.quantize_and_save(out, format="gguf:q4_k_s")
        files.append(next(out.glob("*.gguf")).read_bytes())
    assert files[0] == files[1]


def test_bad_gguf_requests_fail_before_quantizing(tmp_path):
    with pytest.raises(ExportError, match="gpt2"):
        AutoRound(tiny_model("gpt2"), iters=0, scheme="gguf:q4_0").quantize_and_save(tmp_path / "a", format="gguf:q4_0")
    with pytest.raises(ExportError, match="cannot be combined"):
        AutoRound(wide_model("llama"), iters=0, scheme="gguf:q4_0").quantize_and_save(tmp_path / "b", format="auto_round,gguf:q4_0")
    ar = AutoRound(wide_model("llama"), iters=0, scheme="gguf:q4_0", disable_opt_rtn=True, low_cpu_mem_usage=False)
    with pytest.raises(ExportError, match="ggml"):
        ar.quantize_and_save(tmp_path / "c", format="auto_round")
    ar.quantize()
    with pytest.raises(ExportError, match="needs scheme"):
        ar.save_quantized(tmp_path / "d", format="gguf:q8_0")
    assert not any((tmp_path / d).exists() for d in "abcd")


@pytest.mark.parametrize("choice, embd", [
    (dict(layer_config={"lm_head": {"gguf": "q8_0"}, "model.embed_tokens": {"bits": 6}}), "Q6_K"),
    (dict(layer_config={"lm_head": "gguf:q8_0"}, fp_layers="embed_tokens"), "F16"),
], ids=["bits", "fp_layers"])
def test_embedding_and_output_types_from_layer_config(tmp_path, choice, embd):
    """llama-quantize's --token-embedding-type / --output-tensor-type: the exact embedding name in layer_config
    (a bit width = the ggml type of that width) or in fp_layers; lm_head as any layer."""
    ar, path = quantize_to_gguf(tmp_path, wide_model("llama"), "gguf:q4_k_m", **choice)
    types = tensor_types(path)
    assert types["token_embd.weight"] == embd and types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q4_K"  # the rest keeps the mix's rules
    if embd == "F16":  # stored as f16 (llama.cpp's float type), the model in memory keeps fp32
        emb = ar.model.model.embed_tokens.weight
        assert torch.equal(reload(path).model.embed_tokens.weight, emb.half().float())
        emb.data = emb.data.half().float()
    assert_same_model(ar, path)
    with pytest.raises(Exception, match="matches no quantizable layer"):
        AutoRound(wide_model("llama"), tiny_tokenizer(), scheme="gguf:q4_k_m", fp_layers="embed_tokens,nothing_here")


def test_phi3_and_gemma2_files_carry_what_llama_cpp_reads(tmp_path):
    """Phi-3's fused projections get llama.cpp's attn_qkv rule (Q5_K in q4_k_m); Gemma2's sliding window and both
    softcapping values are written under llama.cpp's keys (transformers' loader ignores the softcapping)."""
    _, path = quantize_to_gguf(tmp_path, wide_model("phi3"), "gguf:q4_k_m")
    types = tensor_types(path)
    assert types["blk.0.attn_qkv.weight"] == "Q5_K" and types["blk.0.ffn_up.weight"] == "Q4_K"
    assert "blk.0.attn_q.weight" not in types
    _, path = quantize_to_gguf(tmp_path / "gemma2", wide_model("gemma2"), "gguf:q4_k_m")
    fields = gguf.GGUFReader(path).fields
    value = lambda key: fields[key].parts[fields[key].data[0]][0]  # noqa: E731
    assert value("gemma2.attn_logit_softcapping") == pytest.approx(50.0)
    assert value("gemma2.final_logit_softcapping") == pytest.approx(30.0)
    assert value("gemma2.attention.sliding_window") == 8


def test_gemma2_with_another_sliding_pattern_is_refused(tmp_path):
    config = CONFIGS["gemma2"]()
    config.layer_types = ["full_attention", "sliding_attention"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ar = AutoRound(model, tiny_tokenizer(), scheme="gguf:q4_0", iters=0)
    with pytest.raises(ExportError, match="even layers"):
        ar.quantize_and_save(tmp_path / "out", format="gguf:q4_0")
    assert not (tmp_path / "out").exists()  # refused before quantizing
