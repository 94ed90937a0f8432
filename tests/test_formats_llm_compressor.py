"""llm_compressor export (compressed-tensors pack-quantized), read back by the compressed-tensors package's
own config parser and decompressor, and loaded by plain transformers (its compressed-tensors integration).

Tolerance: scales are stored in fp16 and our fake-quant weights are fp16 scales times integers computed in
fp32; decompressing with the scales cast to fp32 must give them bit for bit. The transformers round trip
compares logits within 1e-4 * (1 + max|logit|) in fp32.
"""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from auto_round import AutoRound
from auto_round.export.writer import ExportError
from tiny_models import random_ids, tiny_model

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402


def quantize(tmp_path, arch="llama", **kw):
    ar = AutoRound(tiny_model(arch), dataset=random_ids(), nsamples=4, seqlen=16, batch_size=2,
                   low_cpu_mem_usage=False, **{"iters": 2, "group_size": 32, **kw})
    out = tmp_path / "ct"
    ar.quantize_and_save(out, format="llm_compressor")
    return ar, out


def scheme_for(config: QuantizationConfig, name: str):
    """The config group compressed-tensors would apply: an exact-name target wins over a class target."""
    exact = [g for g in config.config_groups.values() if name in g.targets]
    return exact[0] if exact else next(g for g in config.config_groups.values() if "Linear" in g.targets)


@pytest.mark.parametrize("kw", [{"bits": 4}, {"bits": 4, "sym": False}, {"bits": 2, "sym": False}, {"bits": 3},
                                {"bits": 8, "sym": False}, {"group_size": -1, "sym": False},
                                {"layer_config": {"down_proj": {"bits": 8}, "model.layers.1.self_attn.o_proj": {"bits": 16}}}])
def test_compressed_tensors_decompresses_our_fake_quant_weights(tmp_path, kw):
    ar, out = quantize(tmp_path, **kw)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)  # the consumer's own schema
    assert config.quant_method == "compressed-tensors" and config.quantization_status == "compressed"
    tensors = load_file(str(out / "model.safetensors"))
    for name in ar.results:
        module_state = {k.split(".")[-1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        assert "weight" not in module_state
        module_state["weight_scale"] = module_state["weight_scale"].float()
        scheme = scheme_for(config, name)
        assert scheme.weights.num_bits == ar.results[name].scheme.bits
        weight = PackedQuantizationCompressor.decompress(module_state, scheme)["weight"]
        assert torch.equal(weight, ar.model.get_submodule(name).weight), name
    fp_layers = [n for n, s in ar.layer_schemes.items() if not s.is_quantized]
    assert set(fp_layers) <= set(config.ignore) and "lm_head" in config.ignore


@pytest.mark.parametrize("kw", [{"bits": 4, "sym": False}, {"bits": 2, "sym": False}, {"bits": 4}])
def test_same_tensors_as_compressed_tensors_own_compressor(tmp_path, kw):
    """Our packed tensors equal what compressed-tensors writes for the same weights, scales and zero points."""
    ar, out = quantize(tmp_path, **kw)
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    tensors = load_file(str(out / "model.safetensors"))
    for name, res in list(ar.results.items())[:3]:
        half = 2 ** (res.scheme.bits - 1)
        state = {"weight": ar.model.get_submodule(name).weight.detach(), "weight_scale": res.scale.float()}
        if not res.scheme.sym:
            state["weight_zero_point"] = (res.zero_point - half).to(torch.int8)
        theirs = PackedQuantizationCompressor.compress(state, scheme_for(config, name))
        for key in ("weight_packed", "weight_shape", "weight_zero_point"):
            if key in theirs:
                assert torch.equal(theirs[key], tensors[f"{name}.{key}"]), (name, key)
        assert ("weight_zero_point" in theirs) == (f"{name}.weight_zero_point" in tensors)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_plain_transformers_loads_it(tmp_path, arch):
    """Sym only: transformers 5.24 with compressed-tensors 0.20 sizes an asym weight_zero_point unpacked
    ([out, n_groups]) before loading, while compressed-tensors' own compressor writes it packed
    ([out*b/32, n_groups], as vLLM reads it), so it cannot load compressed-tensors' own asym files either."""
    ar, out = quantize(tmp_path, arch)
    ids = random_ids(2, 12, seed=1)
    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ar.model(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-4 * (1 + want.abs().max().item())


def test_mixed_bits_write_several_groups(tmp_path):
    ar, out = quantize(tmp_path, layer_config={"model.layers.0.mlp.down_proj": {"bits": 8}})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 2
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["config_groups"]["group_1"]["targets"] == ["model.layers.0.mlp.down_proj"]


def test_conv1d_and_ragged_groups_are_refused_before_tuning(tmp_path):
    for arch, kw, match in [("gpt2", {}, "Conv1D"), ("llama", {"group_size": 48}, "divisible by group_size")]:
        ar = AutoRound(tiny_model(arch), dataset=random_ids(), nsamples=4, seqlen=16, batch_size=2, iters=2,
                       **{"group_size": 32, **kw})
        with pytest.raises(ExportError, match=match):
            ar.quantize_and_save(tmp_path / arch, format="llm_compressor")
        assert not ar.quantized
