"""auto_round format for MX / NVFP4 / FP8 (packing auto_round:llm_compressor / auto_round:fp8_static), loaded by
transformers through our FloatQuantLinear, and the fp8 format (FP8_BLOCK) loaded by transformers' FineGrainedFP8.

Tolerances: auto_round checkpoints load bit for bit (logits equal to the in-memory fake-quantized model: same fp32
dequantization, same activation qdq from the stored static scales). fp8 format on CPU: transformers dequantizes
the blocks into plain Linear layers (weights equal to ours bit for bit) and quantizes no activations there
("Using FP8 quantized models requires a GPU or XPU, we will default to dequantizing"), so its logits differ from
ours by the missing fp8 activation qdq (<= 0.1 * max|logit|, measured 0.039 / 0.85); with our activation
quantizer on its layers they are equal.
"""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from auto_round import AutoRound
from auto_round.algorithms.act_quant import ActQuantizer
from auto_round.export.writer import ExportError
from auto_round.inference.qlinear_float import FloatQuantLinear
from tiny_models import VOCAB, random_ids, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


def llama128():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save(out, fmt, model=None, low_mem=False, **kw):
    ar = AutoRound(model if model is not None else tiny_model("llama"), dataset=random_ids(8, 16), nsamples=8,
                   seqlen=16, batch_size=4, amp=False, low_cpu_mem_usage=low_mem, **{"iters": 0, **kw})
    ar.quantize_and_save(out, format=fmt)
    return ar


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("scheme,iters,packing", [
    ("MXFP4", 0, "auto_round:llm_compressor"), ("MXFP6", 0, "auto_round:llm_compressor"),
    ("MXFP8", 0, "auto_round:llm_compressor"),
    ("NVFP4", 2, "auto_round:llm_compressor"), ("FP8_STATIC", 2, "auto_round:fp8_static"),
    ("FP8_BLOCK", 0, "auto_round:fp8_static"),  # 64-wide layers: ragged blocks and activation groups
    ("FPW8A16", 0, "auto_round:fp8_static"),
])
def test_auto_round_float_round_trip_is_exact(tmp_path, scheme, iters, packing):
    ar = save(tmp_path / "ar", "auto_round", scheme=scheme, iters=iters)
    qc = json.loads((tmp_path / "ar" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc["packing_format"] == packing
    assert (qc.get("act_bits", 16) < 16) == ar.scheme.quantizes_activations
    tensors = load_file(str(tmp_path / "ar" / "model.safetensors"))
    down = "model.layers.0.mlp.down_proj"
    static = {"NVFP4": "input_global_scale", "FP8_STATIC": "input_scale"}.get(scheme)
    assert {k.rsplit(".", 1)[1] for k in tensors if k.startswith(down + ".input")} == ({static} if static else set())
    if scheme == "FP8_BLOCK":
        assert tensors[f"{down}.weight_scale_inv"].shape == (1, 1) and tensors[f"{down}.weight"].dtype == torch.float8_e4m3fn
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ar", dtype=torch.float32).eval()
    for name in ar.results:
        layer = model.get_submodule(name)
        assert isinstance(layer, FloatQuantLinear)
        assert torch.equal(layer.dequantize(torch.float32), ar.model.get_submodule(name).weight), name
    ids = random_ids(2, 12, seed=1)
    assert torch.equal(logits(model, ids), logits(ar.model, ids))


@pytest.mark.parametrize("scheme", ["FP8_STATIC", "FPW8A16"])
def test_fp8_groups_as_wide_as_the_row_round_trip(tmp_path, scheme):
    """FP8 in groups of 64 on the tiny llama: a 64-wide layer has one group per row, which the loader reads as
    a per-channel [out] scale (the writer wrote [out, 1] and the reload failed); down_proj (128 wide) keeps
    [out, 2]."""
    ar = save(tmp_path / "ar", "auto_round", scheme=scheme, group_size=64)
    tensors = load_file(str(tmp_path / "ar" / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64,)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 2)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ar", dtype=torch.float32).eval()
    for name in ar.results:
        assert torch.equal(model.get_submodule(name).dequantize(torch.float32), ar.model.get_submodule(name).weight), name
    ids = random_ids(2, 12, seed=1)
    assert torch.equal(logits(model, ids), logits(ar.model, ids))


def test_auto_round_float_immediate_packing_is_the_same_checkpoint(tmp_path):
    ar = save(tmp_path / "low", "auto_round", low_mem=True, scheme="NVFP4", iters=2)
    assert ar.packed
    save(tmp_path / "full", "auto_round", scheme="NVFP4", iters=2)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("low", "full"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_format_loads_through_transformers(tmp_path):
    ar = save(tmp_path / "fp8", "fp8", model=llama128(), scheme="FP8_BLOCK")
    qc = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert qc == {"activation_scheme": "dynamic", "fmt": "e4m3", "ignored_layers": ["lm_head"], "quant_method": "fp8",
                  "weight_block_size": [128, 128]}
    tensors = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 2)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    for name in ar.results:
        assert torch.equal(model.get_submodule(name).weight, ar.model.get_submodule(name).weight), name
    ids = random_ids(2, 12, seed=1)
    want = logits(ar.model, ids)
    assert (logits(model, ids) - want).abs().max().item() <= 0.1 * want.abs().max().item()
    for name, res in ar.results.items():  # the runtime's dynamic fp8 activations, as our quantizer does them
        ActQuantizer(res.scheme).install(model.get_submodule(name))
    assert torch.equal(logits(model, ids), want)


@pytest.mark.parametrize("fmt,kw,match", [
    ("fp8", {"scheme": "FP8_BLOCK"}, "128-column blocks"),
    ("fp8", {"scheme": "FP8_STATIC"}, "2-D blocks"),
    ("fp8", {"scheme": "FP8_BLOCK", "act_bits": 16, "model": "llama128"}, "dynamically in groups of 128"),
    ("auto_round", {"scheme": "INT8"}, "W8A8"),
    ("auto_round", {"scheme": "MXINT4"}, "MXINT"),
    ("auto_round", {"scheme": "NVFP4", "layer_config": {"down_proj": "W4A16"}}, "one packing_format"),
    ("auto_round:fp8_static", {"scheme": "NVFP4"}, "needs packing auto_round:llm_compressor"),
    ("auto_round:llm_compressor", {"scheme": "W4A16", "group_size": 32}, "holds MX / NVFP4 weights"),
])
def test_formats_refuse_what_they_cannot_hold_before_tuning(tmp_path, fmt, kw, match):
    model = llama128() if kw.pop("model", None) else tiny_model("llama")
    ar = AutoRound(model, dataset=random_ids(8, 16), nsamples=8, seqlen=16, iters=2, **kw)
    with pytest.raises(ExportError, match=match):
        ar.quantize_and_save(tmp_path / "x", format=fmt)
    assert not ar.quantized
