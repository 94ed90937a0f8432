"""The dtype a saved model is evaluated in (eval/load_dtype.py): compressed-tensors MXFP4 / MXFP6 / NVFP4 / MXFP8 weights
decompress to bf16 only (compressed-tensors 0.20), so they are evaluated in bf16 by default and an explicit
fp32 is refused with a clear error; every other checkpoint keeps fp32 on CPU."""

import pytest
import torch
import torch.nn.functional as F

from auto_round import AutoRound
from auto_round.eval.lm_eval_runner import load_for_eval
from auto_round.model.loading import ModelLoadError
from tiny_models import random_ids, tiny_model, tiny_tokenizer


def export(tmp_path, scheme: str):
    ar = AutoRound(tiny_model("llama"), tiny_tokenizer(), scheme=scheme, iters=0, dataset=random_ids(4, 16, seed=2),
                   low_cpu_mem_usage=False)
    out = tmp_path / scheme
    ar.quantize_and_save(out, format="llm_compressor")
    return ar.model, out


@pytest.mark.parametrize("scheme,fmt", [("MXFP4", "mxfp4-pack-quantized"), ("MXFP6", "mxfp6-pack-quantized"),
                                        ("NVFP4", "nvfp4-pack-quantized"), ("MXFP8", "mxfp8-quantized")])
def test_bf16_only_formats_evaluate_in_bf16(tmp_path, scheme, fmt):
    fake, out = export(tmp_path, scheme)
    model, _ = load_for_eval(out, device="cpu")
    assert model.dtype == torch.bfloat16
    ids = random_ids(2, 16, seed=9)
    with torch.no_grad():
        got, want = model(ids).logits.float(), fake(ids).logits
    # the same model, computed in bf16 with compressed-tensors' own activation qdq: close, not equal
    assert torch.isfinite(got).all()
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95
    with pytest.raises(ModelLoadError, match=fmt):
        load_for_eval(out, device="cpu", dtype="fp32")


def test_other_checkpoints_keep_fp32(tmp_path):
    _, out = export(tmp_path, "W4A16G32")
    model, _ = load_for_eval(out, device="cpu")
    assert model.dtype == torch.float32


def test_asym_llm_compressor_exports_load_decompressed(tmp_path):
    """Asymmetric pack-quantized weights: transformers' compressed-mode loading mis-sizes the packed zero points
    (it failed with a size mismatch); the export is evaluated decompressed, with the fake-quant model's logits
    (the decompressor dequantizes with fp16 scales in fp32: close, not bit-equal)."""
    ar = AutoRound(tiny_model("llama"), tiny_tokenizer(), scheme="W4A16G32", sym=False, iters=0,
                   dataset=random_ids(4, 16, seed=2), low_cpu_mem_usage=False)
    ar.quantize_and_save(tmp_path / "asym", format="llm_compressor")
    assert_evaluates_like_the_fake_model(ar, tmp_path / "asym")


def assert_evaluates_like_the_fake_model(ar, folder) -> None:
    """load_for_eval(folder) gives the logits of the in-memory fake-quantized model (to 1e-3 of their max)."""
    model, _ = load_for_eval(folder, device="cpu")
    ids = random_ids(2, 16, seed=9)
    with torch.no_grad():
        got, want = model(ids).logits, ar.model(ids).logits
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_asym_exports_transformers_cannot_load_are_refused_clearly(tmp_path):
    """Mixed groups with asym packed weights (ours), and asym packed weights with quantized activations (a
    hand-made config: our int exports with activation quantization are int-quantized, which loads): decompressed
    loading would use one scheme for every layer / drop the activation quantization, so both are refused."""
    import json

    ar = AutoRound(tiny_model("llama"), tiny_tokenizer(), scheme="W4A16G32", sym=False, iters=0, disable_opt_rtn=True,
                   dataset=random_ids(4, 16, seed=2), layer_config={"model.layers.0.mlp.down_proj": {"bits": 8}})
    ar.quantize_and_save(tmp_path / "mixed", format="llm_compressor")
    with pytest.raises(ModelLoadError, match="asymmetric pack-quantized weights with several config groups.*vLLM loads it"):
        load_for_eval(tmp_path / "mixed", device="cpu")
    ar = AutoRound(tiny_model("llama"), tiny_tokenizer(), scheme="W4A16G32", sym=False, iters=0, disable_opt_rtn=True,
                   dataset=random_ids(4, 16, seed=2))
    ar.quantize_and_save(tmp_path / "act", format="llm_compressor")
    config = json.loads((tmp_path / "act" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    (tmp_path / "act" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="asymmetric pack-quantized weights with quantized activations"):
        load_for_eval(tmp_path / "act", device="cpu")


@pytest.mark.parametrize("arch", ["falcon", "gpt_bigcode"])
def test_packed_llm_compressor_exports_of_falcon_like_models_load_decompressed(tmp_path, arch):
    """transformers' weight init of Falcon / GPTBigCode reads module.weight of their own Linear modules, which
    compressed-tensors' compressed mode has replaced by weight_packed (it failed with "'FalconLinear' object has no
    attribute 'weight'"). Weight-only exports are evaluated decompressed with the fake model's logits; with
    quantized activations (NVFP4) decompressed loading would drop them, so that is refused, naming the way out."""
    ar = AutoRound(tiny_model(arch), tiny_tokenizer(), scheme="W4A16G32", iters=0, dataset=random_ids(4, 16, seed=2),
                   low_cpu_mem_usage=False)
    ar.quantize_and_save(tmp_path / "w4", format="llm_compressor")
    assert_evaluates_like_the_fake_model(ar, tmp_path / "w4")
    ar = AutoRound(tiny_model(arch), tiny_tokenizer(), scheme="NVFP4", iters=0, dataset=random_ids(4, 16, seed=2))
    ar.quantize_and_save(tmp_path / "nvfp4", format="llm_compressor")
    with pytest.raises(ModelLoadError, match="compressed mode for this architecture.*quantized activations.*'auto_round'"):
        load_for_eval(tmp_path / "nvfp4", device="cpu")
