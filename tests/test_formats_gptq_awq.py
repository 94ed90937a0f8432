"""auto_gptq and auto_awq exports, read back by decoders written from the published layouts, and by
transformers (through AutoRoundConfig: plain GPTQ/AWQ loading in transformers needs gptqmodel, which
only builds from source).

The decoders below follow the format descriptions (GPTQ: values packed along in_features into a
little-endian bit stream of int32 words, qzeros store zp - 1 and kernels add 1 back; AWQ GEMM: values
packed along out_features, output j of each run of 8 at bit offset 4 * [0, 4, 1, 5, 2, 6, 3, 7][j]), one
value at a time with Python integers, sharing no code with auto_round.packing.

Tolerance of the transformers round trip: GPTQ/AWQ checkpoints keep every float tensor in fp16, so the
fake-quantized model is compared after rounding its float parameters to fp16 too; the weights are then
identical and the logits agree to 1e-4 * (1 + max|logit|) in fp32.
"""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from auto_round import AutoRound
from auto_round.export.writer import ExportError
from auto_round.inference.qlinear import QuantLinear
from tiny_models import random_ids, tiny_model

AWQ_SHIFT = [0, 4, 1, 5, 2, 6, 3, 7]  # output j of a run of 8 -> nibble index


def gptq_column_values(words: list[int], bits: int, count: int) -> list[int]:
    """`count` values of `bits` bits from int32 words read as one little-endian bit stream."""
    stream = 0
    for k, word in enumerate(words):
        stream |= (word & 0xFFFFFFFF) << (32 * k)
    return [(stream >> (bits * i)) & ((1 << bits) - 1) for i in range(count)]


def decode_gptq(qweight, qzeros, scales, g_idx, bits, in_f):
    """W [out, in] from GPTQ v1 tensors, as a GPTQ kernel computes it: s * (q - (stored_zero + 1))."""
    out_f = scales.shape[1]
    q = torch.tensor([gptq_column_values(qweight[:, o].tolist(), bits, in_f) for o in range(out_f)], dtype=torch.float64)
    z = torch.tensor([gptq_column_values(qzeros[g].tolist(), bits, out_f) for g in range(qzeros.shape[0])],
                     dtype=torch.float64) + 1  # [n_groups, out]
    s = scales.double()
    g = g_idx.long()
    return s[g].t() * (q - z[g].t())


def decode_awq(qweight, qzeros, scales, group, out_f):
    def unpack_rows(packed):  # [rows, out/8] int32 -> [rows, out]
        rows = []
        for row in packed.tolist():
            vals = []
            for word in row:
                vals.extend(((word & 0xFFFFFFFF) >> (4 * AWQ_SHIFT[j])) & 0xF for j in range(8))
            rows.append(vals)
        return torch.tensor(rows, dtype=torch.float64)

    q = unpack_rows(qweight)  # [in, out]
    z = unpack_rows(qzeros)  # [n_groups, out]
    gidx = torch.arange(q.shape[0]) // group
    return (scales.double()[gidx] * (q - z[gidx])).t()


def quantize(tmp_path, fmt, arch="llama", **kw):
    ar = AutoRound(tiny_model(arch), dataset=random_ids(), nsamples=4, seqlen=16, batch_size=2,
                   low_cpu_mem_usage=False, **{"iters": 2, "group_size": 32, **kw})
    out = tmp_path / fmt.replace(":", "-")
    ar.quantize_and_save(out, format=fmt)
    return ar, out


def fp16_rounded_logits(ar, ids):
    """Logits of the fake-quantized model with its float parameters rounded to fp16 (what GPTQ/AWQ store)."""
    model = ar.model
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    packed = {f"{name}.weight" for name in ar.results}  # s * q is kept exactly by the packed form
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in packed:
                p.copy_(p.half().float())
        logits = model(input_ids=ids).logits
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return logits


def reload_logits(out, ids):
    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                    quantization_config=tf.AutoRoundConfig()).eval()
    with torch.no_grad():
        return model, model(input_ids=ids).logits


def assert_close(a, b):
    tol = 1e-4 * (1 + a.abs().max().item())
    assert (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_tensors_decode_to_the_fake_quant_weights(tmp_path, bits):
    ar, out = quantize(tmp_path, "auto_gptq", bits=bits)
    t = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["group_size"] == 32 and qc["desc_act"] is False
    assert qc["sym"] is True and qc["lm_head"] is False and config["dtype"] == "float16"
    for name in ar.results:
        in_f = ar.results[name].layout.in_features
        assert t[f"{name}.qweight"].dtype == torch.int32 and t[f"{name}.qweight"].shape[0] == in_f * bits // 32
        assert t[f"{name}.g_idx"].dtype == torch.int32 and t[f"{name}.scales"].dtype == torch.float16
        w = decode_gptq(t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"], t[f"{name}.g_idx"], bits, in_f)
        assert torch.equal(w.float(), ar.model.get_submodule(name).weight), name
    assert all(v.dtype in (torch.float16, torch.int32) for v in t.values())


def test_awq_tensors_decode_to_the_fake_quant_weights(tmp_path):
    for sym in (True, False):
        ar, out = quantize(tmp_path / str(sym), "auto_awq", sym=sym)
        t = load_file(str(out / "model.safetensors"))
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert {k: qc[k] for k in ("quant_method", "version", "bits", "group_size", "zero_point")} == {
            "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": not sym}
        for name, res in ar.results.items():
            w = decode_awq(t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"], 32, res.layout.out_features)
            assert torch.equal(w.float(), ar.model.get_submodule(name).weight), name


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("fmt,kw", [("auto_gptq", {}), ("auto_awq", {"sym": False}), ("auto_awq", {}),
                                    ("auto_round:gptqmodel", {"sym": False})])
def test_transformers_round_trip(tmp_path, arch, fmt, kw):
    ar, out = quantize(tmp_path, fmt, arch, **kw)
    ids = random_ids(2, 12, seed=1)
    model, got = reload_logits(out, ids)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(ar.results)
    want = fp16_rounded_logits(ar, ids) if fmt in ("auto_gptq", "auto_awq") else ar.model(input_ids=ids).logits
    assert_close(got, want.detach())


def test_gptq_mixed_bits_and_float_layers_use_dynamic(tmp_path):
    layer_config = {"model.layers.0.mlp.down_proj": {"bits": 8}, "model.layers.1.self_attn.o_proj": {"bits": 16}}
    ar, out = quantize(tmp_path, "auto_gptq", layer_config=layer_config)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] == {r"+:^model\.layers\.0\.mlp\.down_proj$": {"bits": 8, "group_size": 32, "sym": True},
                             r"-:^model\.layers\.1\.self_attn\.o_proj$": {}}
    assert "self_attn.o_proj" in qc["modules_in_block_to_quantize"][0]
    ids = random_ids(2, 12, seed=1)
    model, got = reload_logits(out, ids)
    assert model.get_submodule("model.layers.0.mlp.down_proj").bits == 8
    assert not isinstance(model.get_submodule("model.layers.1.self_attn.o_proj"), QuantLinear)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.o_proj"), QuantLinear)
    assert_close(got, fp16_rounded_logits(ar, ids).detach())


def test_several_formats_from_one_quantization(tmp_path):
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(), nsamples=4, seqlen=16, batch_size=2, iters=2,
                   group_size=32, sym=False)
    _, paths = ar.quantize_and_save(tmp_path / "multi", format="auto_round,auto_gptq,auto_awq")
    assert [p.name for p in paths] == ["auto-round", "auto-gptq", "auto-awq"]  # the reference names them so
    ids = random_ids(2, 12, seed=1)
    results = [reload_logits(p, ids)[1] for p in paths]
    assert_close(results[0], ar.model(input_ids=ids).logits.detach())
    for got in results[1:]:
        assert_close(got, fp16_rounded_logits(ar, ids).detach())


@pytest.mark.parametrize("fmt,kw,match", [
    ("auto_gptq", {"bits": 5}, "auto_gptq holds 2, 3, 4, 8-bit"),
    ("auto_awq", {"bits": 3}, "4-bit integer weights only"),
    ("auto_awq", {"group_size": 48}, "divisible by group_size"),
    ("auto_awq", {"layer_config": {"down_proj": {"bits": 8}}}, "one scheme for the whole model"),
])
def test_formats_refuse_what_they_cannot_hold_before_tuning(tmp_path, fmt, kw, match):
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(), nsamples=4, seqlen=16, batch_size=2,
                   **{"iters": 2, "group_size": 32, **kw})
    with pytest.raises(ExportError, match=match):
        ar.quantize_and_save(tmp_path / "out", format=fmt)
    assert not ar.quantized and not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_auto_round_holds_5_to_7_bits_as_a_bit_stream(tmp_path, bits):
    ar, out = quantize(tmp_path, "auto_round", bits=bits, sym=False)
    qweight = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.down_proj.qweight"]
    assert qweight.shape == (128 * bits // 32, 64)  # 32 values in `bits` words: no padding bits
    ids = random_ids(2, 12, seed=1)
    _, got = reload_logits(out, ids)
    assert_close(got, ar.model(input_ids=ids).logits.detach())


def test_cli_lists_formats(capsys):
    from auto_round.cli.main import main

    assert main(["list", "format"]) == 0
    printed = capsys.readouterr().out
    assert all(f in printed for f in ("auto_gptq", "auto_awq", "llm_compressor", "auto_round:gptqmodel"))
    assert "phi3, olmo2, cohere" in printed  # the GGUF row names the writer's own architecture table
    assert main(["list", "nonsense"]) == 2
