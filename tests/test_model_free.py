"""model_free=True: plain RTN from the checkpoint's tensor names and files, without building the model.

The export must equal the regular RTN run's byte for byte (tensors, config, quantization_config), for every
format that can take the scheme and on every Linear-based architecture of the suite; settings that need the
model's forward are refused before any work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from auto_round import AutoRound
from auto_round.model.checkpoint_config import ModelFreeError, load_config
from auto_round.model.checkpoint_skeleton import build_skeleton
from auto_round.eval.lm_eval_runner import load_for_eval
from tiny_models import random_ids, saved_tiny_model, tiny_model

COMPARED_FILES = ("config.json", "quantization_config.json", "generation_config.json")


def export(src: Path, out: Path, scheme: str = "W4A16G32", fmt: str = "auto_round", model_free: bool = False,
           **kwargs) -> Path:
    ar = AutoRound(str(src), scheme=scheme, iters=0, disable_opt_rtn=True, model_free=model_free, **kwargs)
    ar.quantize_and_save(str(out), format=fmt)
    return out


def safetensors_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors")) + sorted(p.name for p in folder.glob("*.index.json"))


def assert_same_export(a: Path, b: Path) -> None:
    files = safetensors_files(a)
    assert files and files == safetensors_files(b)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in COMPARED_FILES:
        if (a / name).exists() or (b / name).exists():
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma3", "opt", "falcon", "gpt_bigcode"])
def test_same_export_as_the_regular_rtn_run(tmp_path, arch):
    src = saved_tiny_model(tmp_path / "src", arch)
    regular = export(src, tmp_path / "regular")
    free = export(src, tmp_path / "free", model_free=True)
    assert_same_export(regular, free)
    assert any(k.endswith(".qweight") for k in load_file(free / "model.safetensors"))
    manifest = json.loads((free / "quantization_manifest.json").read_text())
    assert manifest["run"]["model_free"] is True


def test_checkpoint_names_are_kept_where_transformers_renames(tmp_path):
    """transformers 5 renames GPT-NeoX's embed_out to lm_head while loading, so the regular export writes
    lm_head.weight; model_free keeps the checkpoint's name (what vLLM reads). The same values either way, and
    transformers loads both to the same logits."""
    src = saved_tiny_model(tmp_path / "src", "gpt_neox")
    regular = export(src, tmp_path / "regular")
    free = export(src, tmp_path / "free", model_free=True)
    a, b = load_file(regular / "model.safetensors"), load_file(free / "model.safetensors")
    assert set(a) - set(b) == {"lm_head.weight"} and set(b) - set(a) == {"embed_out.weight"}
    assert torch.equal(a.pop("lm_head.weight"), b.pop("embed_out.weight"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = random_ids(2, 12)
    with torch.no_grad():
        want = load_for_eval(regular)[0](ids).logits
        got = load_for_eval(free)[0](ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("scheme,fmt,kwargs", [
    ("W3A16", "auto_round", {"sym": False, "group_size": 32}),   # asym: auto_round packing, raw zero points
    ("W4A16G32", "auto_round", {"sym": False}),                   # asym 4-bit: AWQ layout
    ("W4A16G32", "auto_gptq", {}),
    ("W4A16G32", "llm_compressor", {"fp_layers": "mlp.down_proj"}),
    ("W8A16", "fake", {"quant_lm_head": True}),
    ("MXFP4", "llm_compressor", {}),
    ("MXFP8", "auto_round", {}),
    ("FPW8A16", "auto_round", {}),
    ("FP8_BLOCK", "auto_round", {}),
])
def test_same_export_for_each_format(tmp_path, scheme, fmt, kwargs):
    src = saved_tiny_model(tmp_path / "src", "llama")
    regular = export(src, tmp_path / "regular", scheme, fmt, **kwargs)
    free = export(src, tmp_path / "free", scheme, fmt, model_free=True, **kwargs)
    assert_same_export(regular, free)


def test_bf16_and_sharded_checkpoint(tmp_path):
    src = tmp_path / "src"
    model = tiny_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(src, max_shard_size="60KB")  # several shards and an index
    saved_tiny_model(tmp_path / "tok", "qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "tok" / name, src / name)
    assert len(list(src.glob("*.safetensors"))) > 2
    regular = export(src, tmp_path / "regular", max_shard_size="100KB")
    free = export(src, tmp_path / "free", model_free=True, max_shard_size="100KB")
    assert_same_export(regular, free)
    assert load_file(next(free.glob("*.safetensors")))  # written as shards too
    assert json.loads((free / "config.json").read_text())["dtype"] == "bfloat16"


def test_blocks_are_read_only_when_quantized(tmp_path):
    src = saved_tiny_model(tmp_path / "src", "llama")
    ar = AutoRound(str(src), scheme="W4A16G32", iters=0, model_free=True)
    assert ar.disable_opt_rtn is True  # model_free is plain RTN
    model = ar.model
    assert model.model.layers[0].self_attn.q_proj.weight.is_meta
    assert model.model.embed_tokens.weight.is_meta  # read after the walk, as the regular load defers it
    assert not model.model.norm.weight.is_meta and model.model.norm.weight.dtype == torch.float32
    assert not model.lm_head.weight.is_meta
    ar.quantize_and_save(str(tmp_path / "out"))
    assert not model.model.embed_tokens.weight.is_meta


def test_architecture_transformers_does_not_know(tmp_path):
    """A model type transformers has no class for: the regular load fails, model_free quantizes it from the
    names, with the tensors a known architecture of the same layout gets."""
    src = saved_tiny_model(tmp_path / "src", "llama")
    known = export(src, tmp_path / "known", model_free=True)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="brand_new_lm", architectures=["BrandNewLMForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):
        AutoRound(str(src), scheme="W4A16G32", iters=0, disable_opt_rtn=True)
    new = export(src, tmp_path / "new", model_free=True)
    assert (known / "model.safetensors").read_bytes() == (new / "model.safetensors").read_bytes()
    written = json.loads((new / "config.json").read_text())
    assert written["model_type"] == "brand_new_lm" and written["quantization_config"]["bits"] == 4


def test_skeleton_of_names(tmp_path):
    src = saved_tiny_model(tmp_path / "src", "gpt_neox")
    config, _ = load_config(src)
    skeleton = build_skeleton(src, config)
    assert isinstance(skeleton.gpt_neox.layers, torch.nn.ModuleList) and len(skeleton.gpt_neox.layers) == 2
    qkv = skeleton.gpt_neox.layers[1].attention.query_key_value
    assert isinstance(qkv, torch.nn.Linear) and qkv.bias is not None and qkv.weight.shape == (192, 64)
    assert isinstance(skeleton.get_input_embeddings(), torch.nn.Embedding)
    assert skeleton.get_output_embeddings() is skeleton.embed_out
    state = load_file(src / "model.safetensors")
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in state.items()}


def test_tied_head_stored_twice_is_written_once(tmp_path):
    src = saved_tiny_model(tmp_path / "src", "gemma3")  # ties lm_head to the embedding
    state = load_file(src / "model.safetensors")
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    regular = export(src, tmp_path / "regular")
    free = export(src, tmp_path / "free", model_free=True)
    assert_same_export(regular, free)
    assert "lm_head.weight" not in load_file(free / "model.safetensors")


@pytest.mark.parametrize("kwargs,match", [
    ({"iters": 2}, "iters must be 0"),
    ({"disable_opt_rtn": False}, "opt-RTN"),
    ({"scheme": "FP8_STATIC"}, "static activation"),
    ({"num_hidden_layers": 1}, "num_hidden_layers"),
])
def test_settings_that_need_the_model_are_refused(tmp_path, kwargs, match):
    src = saved_tiny_model(tmp_path / "src", "llama")
    args = {"scheme": "W4A16G32", "iters": 0, **kwargs}
    with pytest.raises(ModelFreeError, match=match):
        AutoRound(str(src), model_free=True, **args)


def test_refusals_of_inputs(tmp_path):
    src = saved_tiny_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ModelFreeError, match="Conv1D"):
        AutoRound(str(src), iters=0, model_free=True)
    with pytest.raises(ModelFreeError, match="not a module"):
        AutoRound(tiny_model("llama"), iters=0, model_free=True)
    llama = saved_tiny_model(tmp_path / "llama", "llama")
    quantized = export(llama, tmp_path / "quantized", model_free=True)
    with pytest.raises(ModelFreeError, match="already quantized"):
        AutoRound(str(quantized), iters=0, model_free=True)


def test_nan_weight_is_named_and_no_output_is_left(tmp_path):
    src = saved_tiny_model(tmp_path / "src", "llama")
    state = load_file(src / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    ar = AutoRound(str(src), scheme="W4A16G32", iters=0, model_free=True)
    with pytest.raises(ModelFreeError, match="model.layers.1.mlp.up_proj.weight"):
        ar.quantize_and_save(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_model_free_defaults_to_plain_rtn(tmp_path):
    src = saved_tiny_model(tmp_path / "src", "llama")
    regular = export(src, tmp_path / "regular", nsamples=1)  # the rtn recipe's settings, recorded in the config
    out = tmp_path / "free"
    run = subprocess.run([sys.executable, "-m", "auto_round", "--model", str(src), "--scheme", "W4A16G32",
                          "--model_free", "--output_dir", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert_same_export(regular, out)
    bad = subprocess.run([sys.executable, "-m", "auto_round", "--model", str(src), "--model_free", "--iters", "5",
                          "--output_dir", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and "iters must be 0" in bad.stderr


def test_names_alone_find_the_token_embedding(tmp_path):
    """Without transformers' class (layout None), OPT's embed_positions must not be taken for the token
    embedding (its tied head holds the token embedding's weight), and GPT-NeoX's embed_out is its head, not an
    embedding."""
    cases = [("opt", "model.decoder.embed_tokens", "lm_head"), ("gpt_neox", "gpt_neox.embed_in", "embed_out")]
    for arch, embedding, head in cases:
        src = saved_tiny_model(tmp_path / arch, arch)
        config, _ = load_config(src)
        skeleton = build_skeleton(src, config, layout=None)
        names = {m: n for n, m in skeleton.named_modules()}
        assert names[skeleton.get_input_embeddings()] == embedding
        got_head = skeleton.get_output_embeddings()
        assert names[got_head] == head
        assert (got_head.weight is skeleton.get_input_embeddings().weight) == (arch == "opt")


def test_experts_transformers_fuses_are_named_in_a_warning(tmp_path, caplog):
    """transformers 5 saves Mixtral's experts one Linear each but fuses them into 3-D parameters when loading:
    model_free quantizes them under the checkpoint's names (vLLM's layout) and warns that transformers cannot
    load them; our loader then refuses the export with a clear error rather than random experts."""
    import transformers as tf

    from auto_round.inference.checkpoint_check import CheckpointError

    config = tf.MixtralConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=32,
                              num_experts_per_tok=2, max_position_embeddings=128)  # a router of 32 rows fits packing
    src = tmp_path / "src"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    saved_tiny_model(tmp_path / "tok", "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "tok" / name, src / name)
    with caplog.at_level("WARNING", logger="auto_round"):
        out = export(src, tmp_path / "out", model_free=True)
    assert "192 Linear layers of the checkpoint are not modules of transformers' class" in caplog.text  # the experts
    state = load_file(out / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.31.w2.qweight" in state
    assert "model.layers.1.block_sparse_moe.gate.weight" in state  # the router stays in floating point
    with pytest.raises((CheckpointError, ValueError), match="missing"):
        load_for_eval(out)


def fp8_block_source(tmp_path) -> Path:
    """A tiny Llama (dims multiples of 128) written in the fp8 format: DeepSeek-V3's layout, fp8 weights with
    128x128 weight_scale_inv blocks and quant_method 'fp8'."""
    import transformers as tf

    from tiny_models import VOCAB, tiny_tokenizer

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    plain = tmp_path / "plain"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(plain)
    tiny_tokenizer().save_pretrained(plain)
    return export(plain, tmp_path / "fp8src", "FP8_BLOCK", "fp8")


def test_fp8_block_source_is_dequantized_then_quantized(tmp_path):
    """model_free on an FP8 block-quantized checkpoint gives the export of the regular RTN run on its
    dequantized weights (W = fp8 * weight_scale_inv per 128x128 block, computed here independently)."""
    src = fp8_block_source(tmp_path)
    stored = load_file(src / "model.safetensors")
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    dequantized = tmp_path / "dequantized"
    shutil.copytree(src, dequantized)
    state = {}
    for name, tensor in stored.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale = stored.get(name[: -len("weight")] + "weight_scale_inv")
        if scale is not None:
            rows, cols = tensor.shape
            full = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            tensor = tensor.float() * full
        state[name] = tensor
    save_file(state, str(dequantized / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dequantized / "config.json").read_text())
    del config["quantization_config"]
    (dequantized / "config.json").write_text(json.dumps(config))
    (dequantized / "quantization_config.json").unlink()
    regular = export(dequantized, tmp_path / "regular")
    free = export(src, tmp_path / "free", model_free=True)
    assert_same_export(regular, free)
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" not in load_file(free / "model.safetensors")


def test_other_quantized_sources_are_refused(tmp_path):
    src = fp8_block_source(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFreeError, match=r"already quantized \(gptq\)"):
        AutoRound(str(src), iters=0, model_free=True)


def test_w4a16_mixed_recipe(tmp_path, caplog):
    """The reference's W4A16_MIXED: routed experts 4-bit, everything else 8-bit (model_free reaches the experts
    transformers 5 fuses); on a dense model it is W8A16 with a warning."""
    import transformers as tf

    config = tf.MixtralConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=128)
    src = tmp_path / "src"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    saved_tiny_model(tmp_path / "tok", "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "tok" / name, src / name)
    ar = AutoRound(str(src), scheme="W4A16_MIXED", iters=0, model_free=True,
                   layer_config={"model.layers.0.block_sparse_moe.experts.2.w1": "W2A16"})  # the user's key wins
    bits = {n: s.bits for n, s in ar.layer_schemes.items() if s.is_quantized}
    assert bits["model.layers.0.self_attn.q_proj"] == 8
    assert bits["model.layers.0.block_sparse_moe.experts.3.w2"] == 4
    assert bits["model.layers.0.block_sparse_moe.experts.2.w1"] == 2
    ar.quantize_and_save(str(tmp_path / "out"))
    qconfig = json.loads((tmp_path / "out" / "quantization_config.json").read_text())
    assert qconfig["bits"] == 8
    dense = saved_tiny_model(tmp_path / "dense", "llama")
    with caplog.at_level("WARNING", logger="auto_round"):
        mixed = export(dense, tmp_path / "mixed", "W4A16_MIXED")
    assert "no layer matches" in caplog.text
    assert_same_export(export(dense, tmp_path / "w8", "W8A16"), mixed)


@pytest.mark.parametrize("arch,scheme", [("llama", "gguf:q4_k_m"), ("qwen2", "gguf:q4_0"), ("gemma3", "gguf:q2_k_s")])
def test_gguf_file_equals_the_regular_rtn_run(tmp_path, arch, scheme):
    """GGUF files too: the embedding and every block layer from the files, llama.cpp's scale search without an
    imatrix (no forward pass), the same file as the regular plain-RTN run."""
    src = saved_tiny_model(tmp_path / "src", arch)
    regular = export(src, tmp_path / "regular", scheme, None)
    free = export(src, tmp_path / "free", scheme, None, model_free=True)
    files = sorted(regular.glob("*.gguf"))
    assert len(files) == 1 and [p.name for p in free.glob("*.gguf")] == [files[0].name]
    assert files[0].read_bytes() == (free / files[0].name).read_bytes()


def test_fp8_block_dequantization_formula():
    """W = fp8 * weight_scale_inv per (bm, bn) block, ragged edge blocks included; a scale grid of the wrong
    shape is an error naming both shapes."""
    from auto_round.model.fp8_source import dequantize_fp8_blocks

    gen = torch.Generator().manual_seed(0)
    for shape in [(256, 384), (200, 300)]:  # whole blocks, ragged blocks
        codes = (torch.randn(shape, generator=gen) * 100).to(torch.float8_e4m3fn)
        rows, cols = -(-shape[0] // 128), -(-shape[1] // 128)
        scale = torch.rand(rows, cols, generator=gen) + 0.5
        got = dequantize_fp8_blocks(codes, scale, (128, 128))
        for r in range(shape[0]):
            for c in (0, shape[1] // 2, shape[1] - 1):
                assert got[r, c] == codes[r, c].float() * scale[r // 128, c // 128]  # fp32 product
    with pytest.raises(ValueError, match=r"\(2, 3\).*expected \[2, 2\]"):
        dequantize_fp8_blocks(codes[:, :256], torch.ones(2, 3), (128, 128))


def test_a_list_with_a_named_entry_is_refused(tmp_path):
    src = saved_tiny_model(tmp_path / "src", "llama")
    state = load_file(src / "model.safetensors")
    state["model.layers.extra.weight"] = torch.ones(4)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    config, _ = load_config(src)
    with pytest.raises(ModelFreeError, match="model.layers.extra mixes numbered and named entries"):
        build_skeleton(src, config)
