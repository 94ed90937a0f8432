"""The `fake` format with activation quantization (reference §4.7): quant_method "auto-round", packing_format
"auto_round:fake", the scheme keys (act_* included) and the static input ranges; transformers' from_pretrained
goes through our loader, which puts the activation quantizers back. Tolerance: none, the loaded model's logits
equal the in-memory fake-quantized model's bit for bit (same weights, same ActQuantizer, same act_max).
"""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from auto_round import AutoRound
from tiny_models import random_ids, tiny_model

CASES = {
    "NVFP4": {"scheme": "NVFP4", "iters": 2},
    "FP8_STATIC": {"scheme": "FP8_STATIC", "iters": 2},
    "MXFP4": {"scheme": "MXFP4"},
    "FP8_BLOCK": {"scheme": "FP8_BLOCK"},  # 64-wide layers: ragged blocks and activation groups
    "INT8": {"scheme": "INT8"},
    "MIXED": {"scheme": "W4A16", "group_size": 32, "layer_config": {"down_proj": "FP8_STATIC", "o_proj": "MXFP8"}},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


def save_fake(tmp_path, **kw):
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), nsamples=8, seqlen=16, batch_size=4, amp=False,
                   low_cpu_mem_usage=False, **{"iters": 0, **kw})
    out = tmp_path / "fake"
    ar.quantize_and_save(out, format="fake")
    return ar, out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_fake_round_trip_puts_the_activation_quantizers_back(tmp_path, case):
    ar, out = save_fake(tmp_path, **CASES[case])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc["packing_format"] == "auto_round:fake"
    assert json.loads((out / "quantization_config.json").read_text()) == qc
    tensors = load_file(str(out / "model.safetensors"))
    static = {n for n, r in ar.results.items() if r.act_max is not None}
    assert {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".act_max")} == static
    assert all(torch.equal(tensors[f"{n}.act_max"], ar.results[n].act_max.reshape(1)) for n in static)
    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    act_layers = {n for n, m in model.named_modules() if getattr(m, "_auto_round_act_quantizer", None) is not None}
    assert act_layers == {n for n, r in ar.results.items() if r.scheme.quantizes_activations}
    ids = random_ids(2, 12, seed=1)
    got = logits(model, ids)
    assert torch.equal(got, logits(ar.model, ids))
    for name in act_layers:  # and the quantizers matter
        model.get_submodule(name)._auto_round_act_quantizer.remove()
    assert not torch.equal(logits(model, ids), got)


def test_fake_config_keys(tmp_path):
    ar, out = save_fake(tmp_path, **CASES["MIXED"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["data_type"], qc["act_bits"]) == (4, 32, "int", 16)
    assert "act_data_type" not in qc  # the main scheme keeps its activations in floating point
    down = qc["extra_config"]["model.layers.0.mlp.down_proj"]
    assert down == {"bits": 8, "group_size": -1, "data_type": "fp", "act_bits": 8, "act_data_type": "fp",
                    "act_group_size": 0, "act_sym": True, "act_dynamic": False}
    assert qc["extra_config"]["model.layers.1.self_attn.o_proj"]["act_data_type"] == "mx_fp"
    ar, out = save_fake(tmp_path / "blk", scheme="FP8_BLOCK")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # transformers' AutoRoundConfig needs an int group_size; the block goes in weight_block_size
    assert (qc["group_size"], qc["weight_block_size"], qc["act_group_size"]) == (128, [128, 128], 128)
    tf.AutoRoundConfig.from_dict(qc)


def test_weight_only_fake_stays_a_plain_checkpoint(tmp_path):
    _, out = save_fake(tmp_path, scheme="FPW8A16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not (out / "quantization_config.json").exists()
