"""llama.cpp's per-tensor type rules for GGUF presets, and the gguf scheme fields."""

import pytest

from auto_round.model.gguf_mix import (ModelShape, assign_gguf_types, block_layer_type, embedding_type, fallback,
                                       output_type, use_more_bits)
from auto_round.schemes import SchemeError, QuantScheme, get_scheme, gguf_mix_of, gguf_scheme, nearest_ggml_type, scheme_for_bits


def test_use_more_bits_matches_llama_cpp_for_30_layers():
    # i < 30/8=3, i >= 7*30/8=26, or (i - 3) % 3 == 2: hand-listed from the C expression
    expected = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
    assert {i for i in range(30) if use_more_bits(i, 30)} == expected


def _types(mix, n_layers=30, n_gqa=3, in_features=576, has_imatrix=False):
    layers = {}
    for i in range(n_layers):
        for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            layers[f"model.layers.{i}.self_attn.{leaf}"] = (in_features, i)
        for leaf in ("gate_proj", "up_proj"):
            layers[f"model.layers.{i}.mlp.{leaf}"] = (in_features, i)
        layers[f"model.layers.{i}.mlp.down_proj"] = (1536, i)
    layers["lm_head"] = (in_features, None)
    schemes = assign_gguf_types(mix, layers, ModelShape(n_layers, n_gqa), outside=frozenset({"lm_head"}),
                                has_imatrix=has_imatrix)
    return {n: s.gguf for n, s in schemes.items()}


def test_q4_k_m_promotions():
    t = _types("q4_k_m", in_features=512)
    more = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
    for i in range(30):
        want = "q6_k" if i in more else "q4_k"
        assert t[f"model.layers.{i}.self_attn.v_proj"] == want
        assert t[f"model.layers.{i}.mlp.down_proj"] == want
        assert t[f"model.layers.{i}.self_attn.q_proj"] == "q4_k"
    assert t["lm_head"] == "q6_k"


def test_shape_fallback_for_rows_not_multiple_of_256():
    t = _types("q4_k_m", in_features=576)  # SmolLM2's hidden size: 576 % 256 != 0
    assert t["model.layers.3.self_attn.q_proj"] == "q5_0"  # q4_k -> q5_0
    assert t["model.layers.0.self_attn.v_proj"] == "q8_0"  # q6_k -> q8_0
    assert t["model.layers.3.mlp.down_proj"] == "q4_k"  # in 1536 = 6 * 256 keeps the k-quant
    assert t["lm_head"] == "q8_0"  # output: row not a multiple of 256 -> q8_0
    assert fallback("q2_k", 576) == "q4_0" and fallback("q5_k", 576) == "q5_1" and fallback("q4_0", 100) == "f16"


def test_q2_k_s_and_q3_k_rules():
    t = _types("q2_k_s", n_layers=16, in_features=512)
    assert [t[f"model.layers.{i}.mlp.down_proj"] for i in range(3)] == ["q4_k", "q4_k", "q2_k"]  # i < 16/8
    assert t["model.layers.0.self_attn.v_proj"] == "q2_k"  # n_gqa 3 < 4
    assert _types("q2_k_s", n_layers=16, n_gqa=4, in_features=512)["model.layers.5.self_attn.v_proj"] == "q4_k"
    m = _types("q3_k_m", n_layers=32, in_features=512)
    assert [m[f"model.layers.{i}.self_attn.v_proj"] for i in (0, 1, 2)] == ["q5_k", "q5_k", "q4_k"]
    assert [m[f"model.layers.{i}.mlp.down_proj"] for i in (0, 1, 2)] == ["q5_k", "q5_k", "q4_k"]  # i < 32/16
    assert m["model.layers.4.self_attn.o_proj"] == "q4_k"
    assert _types("q3_k_l", in_features=512)["model.layers.9.self_attn.v_proj"] == "q5_k"
    assert _types("q3_k_s", in_features=512)["model.layers.9.self_attn.v_proj"] == "q3_k"


def test_legacy_mixes_and_imatrix_guard():
    t = _types("q4_0", n_layers=16, in_features=512)
    assert t["model.layers.0.mlp.down_proj"] == "q4_0" and t["lm_head"] == "q6_k"
    g = _types("q4_0", n_layers=16, in_features=512, has_imatrix=True)
    assert g["model.layers.0.mlp.down_proj"] == "q4_1" and g["model.layers.2.mlp.down_proj"] == "q4_0"
    assert _types("q8_0", in_features=512)["lm_head"] == "q8_0"
    assert output_type("bf16", 576) == "bf16"
    # llama.cpp picks q6_k for a tied q4_0 embedding, then its rows (576) fall back to q8_0
    assert embedding_type("q4_0", True, 576) == "q8_0" and embedding_type("q4_0", False, 576) == "q4_0"
    assert embedding_type("q4_k_m", True, 512) == "q6_k" and embedding_type("q4_k_m", False, 576) == "q5_0"
    assert block_layer_type("q4_k_s", "attn_v", 3, ModelShape(30)) == "q5_k"


def test_gguf_schemes():
    assert gguf_mix_of("GGUF:Q4_K_M") == "q4_k_m" and gguf_mix_of("W4A16") is None
    with pytest.raises(SchemeError, match="unknown GGUF preset"):
        gguf_mix_of("gguf:q9_k")
    s = get_scheme("gguf:q4_k_m")
    assert (s.bits, s.group_size, s.sym, s.gguf) == (4, 32, False, "q4_k")
    assert get_scheme("gguf:q6_k").sym and get_scheme("gguf:q2_k_s").group_size == 16
    assert not get_scheme("gguf:bf16").is_quantized
    with pytest.raises(SchemeError, match="fixes bits"):
        QuantScheme(bits=4, group_size=128, sym=True, gguf="q4_k")
    with pytest.raises(SchemeError, match="unknown ggml type"):
        gguf_scheme("q7_k")
    # a layer_config bit width in a GGUF model means the ggml type of that width
    assert scheme_for_bits(s, {"bits": 6}).gguf == "q6_k"
    assert scheme_for_bits(s, {"bits": 8}).gguf == "q8_0"
    assert scheme_for_bits(s, {"bits": 16}) == gguf_scheme("f16")
    assert nearest_ggml_type(4, "q4_0") == "q4_0" and nearest_ggml_type(5, "q4_k") == "q5_k"
