"""Per-layer scheme resolution: overrides, regexes, fp_layers, lm_head and the packing shape rule."""

import pytest
import torch
import transformers as tf

from auto_round.model.blocks import find_block_groups
from auto_round.model.layer_config import resolve_layer_schemes
from auto_round.schemes import FP_SCHEME, QuantScheme, SchemeError, get_scheme, resolve_scheme
from tiny_models import tiny_model

W4 = get_scheme("W4A16")


def resolve(model, **kw):
    return resolve_layer_schemes(model, find_block_groups(model), W4, **kw)


def untied_llama(hidden=64):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg).eval()


def test_defaults_cover_block_layers_only():
    schemes = resolve(tiny_model("llama"))
    assert len(schemes) == 14 and all(s == W4 for s in schemes.values())
    assert "lm_head" not in schemes


def test_exact_names_win_over_regex_and_bits16_means_fp():
    layer_config = {"mlp": {"bits": 8}, "model.layers.0.mlp.up_proj": {"bits": 3}, r"layers\.1\.self_attn\.o_proj": {"bits": 16}}
    schemes = resolve(tiny_model("llama"), layer_config=layer_config)
    assert schemes["model.layers.0.mlp.up_proj"].bits == 3
    assert schemes["model.layers.1.mlp.down_proj"].bits == 8 and schemes["model.layers.1.mlp.down_proj"].group_size == 128
    assert schemes["model.layers.1.self_attn.o_proj"] == FP_SCHEME
    assert schemes["model.layers.0.self_attn.q_proj"] == W4


def test_scheme_names_and_objects_as_values():
    schemes = resolve(tiny_model("llama"), layer_config={"k_proj": "W8A16G32", "v_proj": QuantScheme(bits=2, group_size=-1)})
    assert schemes["model.layers.0.self_attn.k_proj"] == get_scheme("W8A16G32")
    assert schemes["model.layers.1.self_attn.v_proj"].group_size == -1


def test_fp_layers_block_suffix_is_exact():
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=11,
                         num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(cfg)
    schemes = resolve(model, fp_layers="layers.1,down_proj")
    assert schemes["model.layers.1.self_attn.q_proj"] == FP_SCHEME
    assert schemes["model.layers.10.self_attn.q_proj"] == W4  # "layers.1" must not match "layers.10"
    assert schemes["model.layers.5.mlp.down_proj"] == FP_SCHEME


def test_unknown_keys_are_errors():
    with pytest.raises(SchemeError, match="matches no quantizable layer"):
        resolve(tiny_model("llama"), layer_config={"nonexistent_proj": {"bits": 8}})
    with pytest.raises(SchemeError, match="fp_layers entry"):
        resolve(tiny_model("llama"), fp_layers="nonexistent")


def test_lm_head_only_when_asked_and_untied():
    assert "lm_head" not in resolve(untied_llama())
    assert resolve(untied_llama(), quant_lm_head=True)["lm_head"] == W4
    assert resolve(untied_llama(), layer_config={"lm_head": {"bits": 8}})["lm_head"].bits == 8
    tied = tiny_model("gpt2")  # GPT-2 ties lm_head to the embeddings
    assert "lm_head" not in resolve(tied, quant_lm_head=True)


def test_unpackable_shapes_stay_fp(caplog):
    model = untied_llama(hidden=80)  # 80 is not a multiple of 32
    schemes = resolve(model)
    assert schemes["model.layers.0.self_attn.q_proj"] == FP_SCHEME
    assert "not multiples of 32" in caplog.text


def test_scheme_overrides_and_validation():
    s = resolve_scheme("W4A16", bits=2, group_size=64, sym=False)
    assert (s.bits, s.group_size, s.sym) == (2, 64, False)
    assert resolve_scheme("w3a16g32") == get_scheme("W3A16G32")
    for bad in (dict(bits=9), dict(bits=1), dict(group_size=-2)):
        with pytest.raises(SchemeError):
            resolve_scheme("W4A16", **bad)
    with pytest.raises(SchemeError, match="unknown scheme"):
        resolve_scheme("W4A17")
    w4a8 = resolve_scheme("W4A16", act_bits=8)  # activations follow the weight: int, group 128, sym
    assert (w4a8.resolved_act_data_type, w4a8.resolved_act_group_size, w4a8.resolved_act_sym) == ("int", 128, True)
    with pytest.raises(SchemeError, match="act_bits=3"):
        resolve_scheme("W4A16", act_bits=3)


def test_the_token_embedding_is_named_as_such_outside_gguf():
    from auto_round import AutoRound

    for kw in (dict(layer_config={"model.embed_tokens": {"bits": 8}}), dict(fp_layers="embed_tokens")):
        with pytest.raises(SchemeError, match="token embedding: it is quantized only in GGUF files"):
            AutoRound(tiny_model("llama"), scheme="W4A16", iters=0, **kw)


def test_fused_members_with_different_schemes_are_warned(caplog):
    """q/k/v and gate/up of one parent are one matmul in vLLM-style runtimes: a layer_config or fp_layers choice
    that splits them is kept (the user asked for it) but warned, naming an example group and its schemes."""
    from auto_round import AutoRound
    from auto_round.algorithms.fused import mixed_groups
    from tiny_models import random_ids

    caplog.set_level("WARNING", logger="auto_round")
    ar = AutoRound(tiny_model("llama"), layer_config={"k_proj": {"bits": 8}}, fp_layers="layers.1.mlp.up_proj",
                   dataset=random_ids(4, 16), iters=0)
    assert ar.layer_schemes["model.layers.0.self_attn.k_proj"].bits == 8
    assert "3 fused group(s) have members with different schemes" in caplog.text
    assert "model.layers.0.self_attn: q_proj int4_g128, k_proj int8_g128, v_proj int4_g128" in caplog.text
    assert mixed_groups(ar.layer_schemes)[-1] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    caplog.clear()
    AutoRound(tiny_model("llama"), layer_config={"self_attn": {"bits": 8}}, dataset=random_ids(4, 16), iters=0)
    AutoRound(tiny_model("llama"), scheme="gguf:q4_k_m", dataset=random_ids(4, 16), iters=0)  # llama.cpp: no fusing
    assert "fused group" not in caplog.text
