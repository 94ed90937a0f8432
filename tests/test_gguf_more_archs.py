"""GGUF export of architectures transformers' GGUF loader cannot read back (OLMo2, Granite, SmolLM3, Cohere, Phi-2,
Gemma): every tensor
is checked against the fake-quantized model through gguf-py's dequantizer (llama.cpp's q/k row order and names),
the architecture's keys through gguf-py's reader, and, where llama-cpp-python is installed, the f32 file's logits
in llama.cpp against ours (Phi-3 and Gemma2 too)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers as tf

from auto_round import AutoRound
from auto_round.export.gguf.arch import permute_rows
from auto_round.export.writer import ExportError
from test_gguf_e2e import WIDE
from tiny_models import random_ids, tiny_tokenizer

CONFIGS = {
    "olmo2": lambda: tf.Olmo2Config(**WIDE),
    # Granite's multipliers differ from 1 so that a missing key would show in llama.cpp's logits
    "granite": lambda: tf.GraniteConfig(**WIDE, embedding_multiplier=12.0, residual_multiplier=0.22,
                                        attention_multiplier=0.0078125, logits_scaling=8.0),
    "smollm3": lambda: tf.SmolLM3Config(**{**WIDE, "num_hidden_layers": 4}),  # layer 3 has no rotary embedding
    "cohere": lambda: tf.CohereConfig(**WIDE, logit_scale=0.5),  # parallel attention / MLP, LayerNorm
    "phi": lambda: tf.PhiConfig(**WIDE),  # Phi-2: LayerNorm with biases, partial rotary, fc1 / fc2 / dense
    "gemma": lambda: tf.GemmaConfig(**WIDE),  # 1 + w norms
}
GGUF_ARCH = {"cohere": "command-r", "phi": "phi2"}
# HF names of the four checked projections per architecture (default: Llama's)
PROJECTIONS = {"phi": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc2")}


def model_of(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def export(tmp_path, model, fmt="gguf:q4_k_m", tokenizer=None):
    ar = AutoRound(model, tokenizer or tiny_tokenizer(), scheme=fmt, iters=0, disable_opt_rtn=True,
                   dataset=random_ids(4, 16), low_cpu_mem_usage=False)
    ar.quantize_and_save(tmp_path, format=fmt)
    return ar, next(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_tensor_dequantizes_to_the_fake_model(tmp_path, arch):
    ar, path = export(tmp_path, model_of(CONFIGS[arch]()))
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg, permute = ar.model.config, arch in ("granite", "smollm3")
    checked = 0
    for i in range(cfg.num_hidden_layers):
        q, k, v, down = PROJECTIONS.get(arch, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "mlp.down_proj"))
        for hf, name, heads in ((q, "attn_q", cfg.num_attention_heads), (k, "attn_k", cfg.num_key_value_heads),
                                (v, "attn_v", None), (down, "ffn_down", None)):
            want = ar.model.get_submodule(f"model.layers.{i}.{hf}").weight.detach().numpy()
            if permute and heads:
                want = permute_rows(want, heads)
            t = tensors[f"blk.{i}.{name}.weight"]
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            assert np.array_equal(got, want), f"blk.{i}.{name}"
            checked += 1
    assert checked == 4 * cfg.num_hidden_layers
    kv = {f.name: f for f in reader.fields.values()}
    value = lambda key: kv[key].parts[kv[key].data[0]][0]  # noqa: E731
    arch_field = kv["general.architecture"]
    assert bytes(arch_field.parts[arch_field.data[0]]).decode() == GGUF_ARCH.get(arch, arch)
    if arch == "olmo2":
        assert {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= set(tensors)
    if arch == "cohere":
        assert value("command-r.logit_scale") == pytest.approx(0.5)
        assert value("command-r.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    if arch == "granite":
        assert value("granite.embedding_scale") == pytest.approx(12.0)
        assert value("granite.residual_scale") == pytest.approx(0.22)
        assert value("granite.attention.scale") == pytest.approx(0.0078125)
        assert value("granite.logit_scale") == pytest.approx(8.0)


def test_smollm3_with_other_nope_layers_is_refused(tmp_path):
    config = CONFIGS["smollm3"]()
    config.no_rope_layers = [1, 1, 0, 1]
    ar = AutoRound(model_of(config), tiny_tokenizer(), scheme="gguf:q4_0", iters=0)
    with pytest.raises(ExportError, match="every 4th layer"):
        ar.quantize_and_save(tmp_path / "out", format="gguf:q4_0")


LLAMA_CPP_CONFIGS = {**CONFIGS, "phi3": lambda: tf.Phi3Config(**WIDE),
                     "gemma2": lambda: tf.Gemma2Config(**WIDE, sliding_window=8),
                     "starcoder2": lambda: tf.Starcoder2Config(**WIDE), "stablelm": lambda: tf.StableLmConfig(**WIDE)}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(LLAMA_CPP_CONFIGS))
def test_f32_files_run_in_llama_cpp_with_our_logits(tmp_path, arch):
    pytest.importorskip("llama_cpp")
    from auto_round.eval.llama_cpp import load_llama
    from auto_round.model.assets import AssetError, smollm2_path
    from transformers import AutoTokenizer

    try:  # llama.cpp needs a BPE vocabulary with merges: SmolLM2's, for a model of its vocabulary size
        tok = AutoTokenizer.from_pretrained(smollm2_path())
    except AssetError as err:
        pytest.skip(f"SmolLM2 tokenizer not available: {err}")
    config = LLAMA_CPP_CONFIGS[arch]()
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = len(tok), 1, 2, 2
    ar, path = export(tmp_path, model_of(config), "gguf:f32", tok)
    ids = tok("The quick brown fox jumps over the lazy dog and runs into the forest.",
              add_special_tokens=False).input_ids[:16]
    llm = load_llama(path, n_ctx=64, n_threads=2, repack=False)
    llm.reset()
    llm.eval(ids)
    cpp = np.asarray(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = ar.model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(cpp - ours).max() <= 2e-3 * np.abs(ours).max()


@pytest.mark.parametrize("arch", ["phi", "starcoder2"])
def test_other_projection_names_get_llama_cpps_per_kind_types(tmp_path, arch):
    """llama.cpp's mix rules go by tensor kind (ffn_down, attn_v, ...): Phi-2's fc2 / dense and StarCoder2's
    c_fc / c_proj get the types Llama's down_proj / o_proj / up_proj get in the same q4_k_m file."""
    from test_gguf_e2e import CONFIGS as E2E

    config = (E2E.get(arch) or CONFIGS[arch])()
    config.intermediate_size = 512
    _, path = export(tmp_path / arch, model_of(config))
    _, llama = export(tmp_path / "llama", model_of(E2E["llama"]()))
    types = lambda p: {t.name: t.tensor_type.name for t in gguf.GGUFReader(p).tensors}  # noqa: E731
    got, want = types(path), types(llama)
    for i in range(2):
        for kind in ("attn_v", "attn_output", "ffn_up", "ffn_down"):
            assert got[f"blk.{i}.{kind}.weight"] == want[f"blk.{i}.{kind}.weight"], (i, kind)
    assert got["blk.1.ffn_down.weight"] == "Q6_K"  # use_more_bits(1, 2): the bigger type
