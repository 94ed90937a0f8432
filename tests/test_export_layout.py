"""auto_round checkpoint layout (reference §4.1): tensor names, dtypes, shapes, zero points, config."""

import json

import pytest
import torch
from safetensors.torch import load_file

from auto_round import AutoRound
from auto_round.export.writer import ExportError
from auto_round.packing import dequantize_gptq, unpack_qzeros
from auto_round.packing.awq import unpack_awq_qweight, unpack_awq_qzeros
from tiny_models import random_ids, tiny_model

LAYER = "model.layers.0.mlp.down_proj"  # in 128, out 64


def quantize(tmp_path, scheme="W4A16", fmt="auto_round", **kw):
    model = tiny_model("llama")
    ar = AutoRound(model, scheme=scheme, dataset=random_ids(), nsamples=4, seqlen=16, batch_size=2,
                   low_cpu_mem_usage=False,  # the tests compare with the fake-quantized weights
                   **{"iters": 2, "group_size": 32, **kw})
    out = tmp_path / "out"
    ar.quantize_and_save(out, format=fmt)
    tensors = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    return ar, tensors, config, out


@pytest.mark.parametrize("scheme,bits", [("W4A16", 4), ("W2A16", 2)])
def test_sym_layout_matches_reference(tmp_path, scheme, bits):
    ar, t, config, out = quantize(tmp_path, scheme)
    assert config["packing_format"] == "auto_round:auto_gptq" and config["quant_method"] == "auto-round"
    assert {k: config[k] for k in ("bits", "group_size", "sym", "data_type")} == {
        "bits": bits, "group_size": 32, "sym": True, "data_type": "int"}
    assert config["block_name_to_quantize"] == "model.layers"
    assert json.loads((out / "quantization_config.json").read_text()) == config
    assert f"{LAYER}.weight" not in t
    qweight, qzeros, scales = t[f"{LAYER}.qweight"], t[f"{LAYER}.qzeros"], t[f"{LAYER}.scales"]
    assert qweight.dtype == torch.int32 and qweight.shape == (128 * bits // 32, 64)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (4, 64 * bits // 32)
    assert scales.dtype == torch.float16 and scales.shape == (4, 64)
    # GPTQ v1 convention: qzeros hold zp - 1 = 2^(b-1) - 1 for every group
    assert torch.all(unpack_qzeros(qzeros, bits, 64) == 2 ** (bits - 1) - 1)
    # dequantizing the packed tensors gives exactly the fake-quantized weight of the model
    deq = dequantize_gptq(qweight, qzeros, scales, bits, 32, 128, zero_offset=1)
    assert torch.equal(deq, ar.model.get_submodule(LAYER).weight)
    assert (scales < 0).any(), "full-range sym stores signed scales"
    assert "lm_head.weight" in t or "model.embed_tokens.weight" in t


def test_asym_w4_uses_awq_layout(tmp_path):
    ar, t, config, _ = quantize(tmp_path, "W4A16", sym=False)
    assert config["packing_format"] == "auto_round:auto_awq" and config["sym"] is False
    qweight, qzeros, scales = t[f"{LAYER}.qweight"], t[f"{LAYER}.qzeros"], t[f"{LAYER}.scales"]
    assert qweight.shape == (128, 64 * 4 // 32) and qzeros.shape == (4, 8) and scales.shape == (4, 64)
    codes = unpack_awq_qweight(qweight, 64).float()
    zeros = unpack_awq_qzeros(qzeros, 64).float()
    gidx = torch.arange(128) // 32
    deq = scales.float()[gidx].t() * (codes - zeros[gidx].t())
    assert torch.equal(deq, ar.model.get_submodule(LAYER).weight)


def test_asym_w2_uses_plain_packing_with_raw_zero_points(tmp_path):
    ar, t, config, _ = quantize(tmp_path, "W2A16", sym=False)
    assert config["packing_format"] == "auto_round"
    deq = dequantize_gptq(t[f"{LAYER}.qweight"], t[f"{LAYER}.qzeros"], t[f"{LAYER}.scales"], 2, 32, 128, zero_offset=0)
    assert torch.equal(deq, ar.model.get_submodule(LAYER).weight)


def test_default_filtering_and_extra_config(tmp_path):
    layer_config = {"model.layers.0.self_attn.k_proj": {"bits": 8}, "o_proj": {"bits": 16}}
    ar, t, config, _ = quantize(tmp_path, "W4A16", layer_config=layer_config, iters=200)
    # defaults (iters 200, lr 1/iters, ...) are dropped; non-defaults kept
    assert "iters" not in config and "lr" not in config and config["nsamples"] == 4
    extra = config["extra_config"]
    assert extra["model.layers.0.self_attn.k_proj"] == {"bits": 8}
    assert extra["model.layers.1.self_attn.o_proj"] == {"bits": 16, "data_type": "fp"}
    assert "model.layers.1.self_attn.o_proj.weight" in t and t["model.layers.1.self_attn.o_proj.weight"].dtype == torch.float32
    assert t["model.layers.0.self_attn.k_proj.qweight"].shape == (64 * 8 // 32, 32)


def test_explicit_awq_refuses_ragged_groups(tmp_path):
    with pytest.raises(ExportError, match="in_features divisible by group_size"):
        quantize(tmp_path, "W4A16", fmt="auto_round:auto_awq", sym=False, group_size=48)
    assert not (tmp_path / "out").exists()
