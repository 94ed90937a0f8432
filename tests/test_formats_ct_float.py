"""llm_compressor export of MX / NVFP4 / FP8 / INT8 W8A8 schemes, read back by the compressed-tensors package (its
config schema, its per-format decompressors, its ModelCompressor) and by transformers' compressed-tensors
integration, against our fake-quantized in-memory model.

Tolerances (compressed-tensors 0.20, transformers 5.24, CPU, fp32 models):
- Weights: decompressed == our fake-quant weight bit for bit, except NVFP4, whose decompressor returns bf16
  (it computes e2m1 * (scale / global_scale) in fp32 like we do, then casts): == our weight cast to bf16.
- Logits of the loaded model, which quantizes each layer's input itself:
  FP8_STATIC, FP8_BLOCK, FPW8A16: bit-identical (same fp8 activation rule, same static input_scale).
  NVFP4: bit-identical once our weights are rounded to bf16 as the decompressor rounds them (its activation
      rule, e4m3(g * amax/6) with g = input_global_scale, is ours).
  MXFP4, INT8, MIXED (MXFP8 main group): the consumer picks dynamic activation scales its own way (MX: a power
      of two rounded up from mantissa 1.75 vs our OCP floor; int8: amax/127.5 vs our full-range amax/128), so
      logits differ, within 0.25 / 0.05 / 0.1 * max|logit| here (measured max|diff| / max|logit|: MXFP4 0.111 /
      0.614, INT8 0.0074 / 0.644, MIXED 0.0118 / 0.649); with our activation quantizer on the loaded weights
      they are bit-identical.
- Not on CPU as is: compressed-tensors' FP4 decompressors always return bf16 weights, so an fp32 model loaded
  with from_pretrained(dtype=float32) fails at its first forward ("expected m1 and m2 to have the same dtype, but
  got: float != c10::BFloat16"); the tests decompress (what that first forward does) and cast the weights to
  fp32; in bf16 the model runs as loaded (NVFP4: max|diff| 0.068 / 0.620 from our fp32 model, bound 0.25).
"""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from auto_round import AutoRound
from auto_round.algorithms.act_quant import ActQuantizer
from auto_round.export.writer import ExportError
from tiny_models import VOCAB, random_ids, tiny_model

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402


def llama128(seed: int = 0):
    """Tiny llama with 128-wide layers: whole 128x128 FP8 blocks and 128-element activation groups."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


MIXED = {"model.layers.0.mlp.down_proj": "MXFP6", "model.layers.1.mlp.down_proj": "FPW8A16",
         "model.layers.0.self_attn.o_proj": "W4A16G32", "model.layers.1.self_attn.o_proj": {"bits": 16}}
CASES = {  # name -> (model factory, AutoRound kwargs)
    "MXFP4": (lambda: tiny_model("llama"), {"scheme": "MXFP4"}),
    "NVFP4": (lambda: tiny_model("llama"), {"scheme": "NVFP4", "iters": 2}),
    "FP8_STATIC": (lambda: tiny_model("llama"), {"scheme": "FP8_STATIC", "iters": 2}),
    "FP8_BLOCK": (llama128, {"scheme": "FP8_BLOCK"}),
    "INT8": (lambda: tiny_model("llama"), {"scheme": "INT8"}),
    "MIXED": (lambda: tiny_model("llama"), {"scheme": "MXFP8", "layer_config": MIXED}),
}


def quantize(case: str, out, low_mem: bool = False):
    make, kw = CASES[case]
    ar = AutoRound(make(), dataset=random_ids(8, 16), nsamples=8, seqlen=16, batch_size=4, amp=False,
                   low_cpu_mem_usage=low_mem, **{"iters": 0, **kw})
    ar.quantize_and_save(out, format="llm_compressor")
    return ar


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            out = tmp_path_factory.mktemp(case.lower())
            cache[case] = (quantize(case, out / "ct"), out / "ct")
        return cache[case]

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield get
    torch.set_num_threads(before)


def config_of(out) -> QuantizationConfig:
    return QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])


def group_of(config: QuantizationConfig, name: str):
    exact = [g for g in config.config_groups.values() if name in g.targets]
    return exact[0] if exact else next(g for g in config.config_groups.values() if "Linear" in g.targets)


EXPECTED_FORMAT = {"MXFP4": "mxfp4-pack-quantized", "NVFP4": "nvfp4-pack-quantized", "FP8_STATIC": "float-quantized",
                   "FP8_BLOCK": "float-quantized", "INT8": "int-quantized", "MIXED": "mixed-precision"}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_decompresses_our_weights(saved, case):
    ar, out = saved(case)
    config = config_of(out)  # the consumer's own schema
    assert config.format == EXPECTED_FORMAT[case] and config.quantization_status == "compressed"
    tensors = load_file(str(out / "model.safetensors"))
    formats = set()
    for name, res in ar.results.items():
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        assert "weight_packed" in state or state["weight"].dtype in (torch.float8_e4m3fn, torch.int8), name
        group = group_of(config, name)
        formats.add(group.format)
        if res.scheme.is_int:  # fp16 scales, as transformers loads them into the fp32 model's parameters
            state["weight_scale"] = state["weight_scale"].float()
        weight = BaseCompressor.get_value_from_registry(group.format).decompress(state, group)["weight"]
        ours = ar.model.get_submodule(name).weight.detach()
        if res.scheme.data_type == "nv_fp":
            assert weight.dtype == torch.bfloat16 and torch.equal(weight, ours.to(torch.bfloat16)), name
        else:
            assert torch.equal(weight.float(), ours), name
    if case == "MIXED":
        assert formats == {"mxfp8-quantized", "mxfp6-pack-quantized", "float-quantized", "pack-quantized"}
        assert "model.layers.1.self_attn.o_proj" in config.ignore


def test_config_groups_carry_the_activation_schemes(saved):
    def group0(case):
        return config_of(saved(case)[1]).config_groups["group_0"]

    nv = group0("NVFP4")
    assert (nv.weights.strategy, nv.weights.group_size, str(nv.weights.scale_dtype)) == ("tensor_group", 16,
                                                                                         "torch.float8_e4m3fn")
    assert (nv.input_activations.strategy, nv.input_activations.dynamic) == ("tensor_group", "local")
    mx = group0("MXFP4").input_activations
    assert (mx.num_bits, mx.type, mx.group_size, mx.dynamic, str(mx.scale_dtype)) == (4, "float", 32, True,
                                                                                       "torch.uint8")
    st = group0("FP8_STATIC")
    assert (st.weights.strategy, st.input_activations.strategy, st.input_activations.dynamic) == ("channel", "tensor",
                                                                                                  False)
    blk = group0("FP8_BLOCK")
    assert blk.weights.block_structure == [128, 128] and blk.weights.strategy == "block"
    assert (blk.input_activations.strategy, blk.input_activations.group_size, blk.input_activations.dynamic) == (
        "group", 128, True)
    i8 = group0("INT8")
    assert (i8.weights.type, i8.weights.strategy, i8.input_activations.strategy, i8.input_activations.dynamic) == (
        "int", "channel", "token", True)
    # static ranges: what our in-memory quantizers used, as the consumer's tensors
    ar, out = saved("FP8_STATIC")
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(tensors[f"{name}.input_scale"], (ar.results[name].act_max / 448).reshape(1))
    ar, out = saved("NVFP4")
    tensors = load_file(str(out / "model.safetensors"))
    assert torch.equal(tensors[f"{name}.input_global_scale"], (448 * 6 / ar.results[name].act_max).reshape(1))
    q, k = (tensors[f"model.layers.0.self_attn.{p}_proj.weight_global_scale"] for p in "qk")
    assert torch.equal(q, k)  # fused q/k/v share one global scale


def load_decompressed(out) -> torch.nn.Module:
    """from_pretrained, then what the first forward would do (decompress), then the weights back to fp32."""
    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model.hf_quantizer.compressor.decompress_model(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype != torch.float32:
            module.weight.data = module.weight.data.float()  # compressed-tensors' FP4 decompressors give bf16
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case,rel_tol", [("FP8_STATIC", 0.0), ("FP8_BLOCK", 0.0), ("NVFP4", 0.0), ("MXFP4", 0.25),
                                          ("INT8", 0.05), ("MIXED", 0.1)])
def test_transformers_round_trip(saved, case, rel_tol):
    ar, out = saved(case)
    ids = random_ids(2, 12, seed=1)
    model = load_decompressed(out)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.quantization_scheme.input_activations is not None  # the loaded model quantizes its inputs
    want = logits(ar.model, ids)
    if case == "NVFP4":  # the decompressor's bf16 weights in our model: then the outputs agree exactly
        saved_w = {n: ar.model.get_submodule(n).weight.data.clone() for n in ar.results}
        for n in ar.results:
            ar.model.get_submodule(n).weight.data = saved_w[n].to(torch.bfloat16).float()
        want_bf16 = logits(ar.model, ids)
        for n in ar.results:
            ar.model.get_submodule(n).weight.data = saved_w[n]
        assert torch.equal(logits(model, ids), want_bf16)
        return
    got = logits(model, ids)
    assert (got - want).abs().max().item() <= rel_tol * want.abs().max().item()
    if rel_tol:
        # the difference is the consumer's dynamic activation rule: with our activation quantizer it is exact
        for name, res in ar.results.items():
            module = model.get_submodule(name)
            module.quantization_enabled = False
            if res.scheme.quantizes_activations:
                ActQuantizer(res.scheme, res.act_max).install(module)
        assert torch.equal(logits(model, ids), want)


def test_fp4_models_run_in_bf16_as_loaded(saved):
    ar, out = saved("NVFP4")
    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ids = random_ids(2, 12, seed=1)
    got, want = logits(model, ids).float(), logits(ar.model, ids)
    assert (got - want).abs().max().item() <= 0.25 * want.abs().max().item()


@pytest.mark.parametrize("case", ["NVFP4", "INT8"])
def test_immediate_packing_writes_the_same_checkpoint(saved, tmp_path, case):
    _, full = saved(case)
    ar = quantize(case, tmp_path / "low", low_mem=True)
    assert ar.packed
    a, b = load_file(str(tmp_path / "low" / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert json.loads((tmp_path / "low" / "config.json").read_text()) == json.loads((full / "config.json").read_text())


@pytest.mark.parametrize("kw,match,holders", [
    ({"scheme": "MXINT4"}, "MXINT has no compressed-tensors layout", "fake"),
    ({"scheme": "FP8_BLOCK"}, "128-column blocks", "auto_round, fake"),  # 64-wide layers
    ({"scheme": {"bits": 4, "group_size": 16, "data_type": "nv_fp", "act_bits": 4, "act_data_type": "nv_fp",
                 "act_group_size": 16}}, "dynamic global scale", "auto_round, fake"),
])
def test_what_llm_compressor_cannot_hold_fails_before_tuning(tmp_path, kw, match, holders):
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), nsamples=8, seqlen=16, iters=2, **kw)
    with pytest.raises(ExportError, match=match) as err:
        ar.quantize_and_save(tmp_path / "x", format="llm_compressor")
    assert "model.layers.0" in str(err.value) and str(err.value).endswith(f"Formats that can hold it: {holders}")
    assert not ar.quantized


@pytest.mark.parametrize("fmt", ["auto_gptq", "auto_awq", "auto_round:auto_gptq"])
def test_integer_formats_refuse_float_schemes_naming_the_alternatives(tmp_path, fmt):
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), nsamples=8, seqlen=16, iters=2, scheme="NVFP4")
    with pytest.raises(ExportError, match="Formats that can hold it: .*llm_compressor") as err:
        ar.quantize_and_save(tmp_path / "x", format=fmt)
    assert "model.layers.0" in str(err.value) and fmt in str(err.value)
    assert not ar.quantized
