"""A bf16 (or mixed-dtype) checkpoint quantized on CPU, where the model is tuned in fp32 by default, is exported
with its unquantized tensors in the dtypes the source stored them in and its config declaring the source's
dtype, as the reference writes it; the quantized tensors are those of an fp32 run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from auto_round import AutoRound
from auto_round.eval.lm_eval_runner import load_for_eval
from auto_round.model.source_dtypes import SourceDtypes, declared_dtype, read_source_dtypes
from tiny_models import random_ids, tiny_model, tiny_tokenizer

PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_packed", ".weight_scale",
                   ".weight_zero_point", ".weight_shape")


def bf16_checkpoint(folder, norms_fp32: bool = False):
    """tiny Llama saved in bf16 (optionally with its norm weights stored in fp32); returns the folder."""
    model = tiny_model("llama").to(torch.bfloat16)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    if norms_fp32:
        state = load_file(folder / "model.safetensors")
        state = {k: (v.float() if "norm" in k else v) for k, v in state.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def quantize(src, out, fmt: str, **kwargs):
    ar = AutoRound(str(src), scheme=kwargs.pop("scheme", "W4A16G32"), iters=0, disable_opt_rtn=True, **kwargs)
    ar.quantize_and_save(str(out), format=fmt)
    return load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text())


def config_dtype(config: dict) -> str:
    return config.get("dtype") or config.get("torch_dtype")


@pytest.mark.parametrize("fmt", ["auto_round", "llm_compressor"])
def test_unquantized_tensors_keep_the_source_bf16(tmp_path, fmt):
    src = bf16_checkpoint(tmp_path / "src")
    source = load_file(src / "model.safetensors")
    ours, config = quantize(src, tmp_path / "out", fmt)
    fp32, fp32_config = quantize(src, tmp_path / "fp32", fmt, model_dtype="fp32")  # asked for: stays fp32
    assert config_dtype(config) == "bfloat16" and config_dtype(fp32_config) == "float32"
    plain = [k for k in ours if not k.endswith(PACKED_SUFFIXES)]
    assert "model.embed_tokens.weight" in plain and "lm_head.weight" in plain and len(plain) >= 7
    for key in plain:  # embeddings, norms, lm_head: the source's bytes
        assert ours[key].dtype == torch.bfloat16, key
        assert torch.equal(ours[key], source[key]), key
        assert fp32[key].dtype == torch.float32, key
    packed = [k for k in ours if k.endswith(PACKED_SUFFIXES)]
    assert len(packed) >= 14 * 2
    for key in packed:  # the quantization itself is the fp32 run's
        assert torch.equal(ours[key], fp32[key]), key


def test_mixed_dtype_source_is_restored_per_tensor(tmp_path):
    src = bf16_checkpoint(tmp_path / "src", norms_fp32=True)
    ours, config = quantize(src, tmp_path / "out", "auto_round")
    norms = [k for k in ours if "norm" in k]
    assert len(norms) == 5
    assert all(ours[k].dtype == torch.float32 for k in norms)
    assert ours["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert config_dtype(config) == "bfloat16"  # what the source's config declares


def test_fake_export_is_written_in_the_source_dtype(tmp_path):
    src = bf16_checkpoint(tmp_path / "src")
    ours, config = quantize(src, tmp_path / "out", "fake")
    fp32, _ = quantize(src, tmp_path / "fp32", "fake", model_dtype="fp32")
    assert config_dtype(config) == "bfloat16"
    assert set(ours) == set(fp32)
    for key, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, key
        assert torch.equal(tensor, fp32[key].to(torch.bfloat16)), key


def test_gptq_stays_fp16(tmp_path):
    ours, config = quantize(bf16_checkpoint(tmp_path / "src"), tmp_path / "out", "auto_gptq")
    assert config_dtype(config) == "float16"
    assert ours["model.embed_tokens.weight"].dtype == torch.float16


def test_bf16_export_reloads_with_the_fake_model_logits(tmp_path):
    src = bf16_checkpoint(tmp_path / "src")
    quantize(src, tmp_path / "out", "auto_round")
    quantize(src, tmp_path / "fake", "fake")
    ids = random_ids(2, 12)
    with torch.no_grad():
        got = load_for_eval(tmp_path / "out")[0](ids).logits.float()
        want = load_for_eval(tmp_path / "fake")[0](ids).logits.float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_source_dtypes_reading(tmp_path):
    assert declared_dtype({"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert declared_dtype({"dtype": "float16"}) == torch.float16
    assert declared_dtype({"text_config": {"dtype": "bfloat16"}}) == torch.bfloat16
    assert declared_dtype({"torch_dtype": "int8"}) is None
    src = bf16_checkpoint(tmp_path / "src", norms_fp32=True)
    dtypes = read_source_dtypes(src)
    assert dtypes.config_dtype == torch.bfloat16
    assert dtypes.of("model.norm.weight") == torch.float32
    assert dtypes.of("renamed.by.transformers") == torch.bfloat16
    cast = SourceDtypes(torch.bfloat16).cast({"a": torch.ones(2), "b": torch.ones(2, dtype=torch.int32)}, skip={"c"})
    assert cast["a"].dtype == torch.bfloat16 and cast["b"].dtype == torch.int32
    # no declared dtype: the dtype holding most of the bytes
    config = json.loads((src / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(config))
    assert read_source_dtypes(src).config_dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["MXFP4", "NVFP4"])
def test_bf16_only_compressed_tensors_exports_are_declared_bf16(tmp_path, scheme):
    """compressed-tensors decompresses MX / NVFP4 weights to bf16 only: the export is declared bf16, so a plain
    from_pretrained(dir) runs (it failed with "expected m1 and m2 to have the same dtype" when an fp32 source was
    declared fp32) and gives the logits of loading it in bf16 explicitly; the other tensors keep the source's fp32."""
    import transformers as tf

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)  # fp32 source
    tiny_tokenizer().save_pretrained(src)
    ar = AutoRound(str(src), scheme=scheme, iters=0, disable_opt_rtn=True, dataset=random_ids(4, 16))
    ar.quantize_and_save(str(tmp_path / "out"), format="llm_compressor")
    state = load_file(tmp_path / "out" / "model.safetensors")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_dtype(config) == "bfloat16"
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    ids = random_ids(2, 12)
    with torch.no_grad():
        plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        got = plain(ids).logits
        want = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)(ids).logits
    assert plain.dtype == torch.bfloat16 and torch.equal(got, want)
