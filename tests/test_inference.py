"""Loading auto_round checkpoints through transformers' built-in AutoRoundQuantizer.

A tiny random model is RTN-quantized here (`quantize_weight_rtn`), its fake-quantized copy is the reference,
and a checkpoint is packed by `write_checkpoint` below (a stand-in for the real exporter). Plain
`AutoModelForCausalLM.from_pretrained(dir)` must then give the reference logits.

Tolerance: the loader dequantizes with the same fp32 products as the fake-quant path (s * (q - z)), so the
weights are bit-identical; logits may differ only by matmul summation order, so we allow
atol = 1e-4 * max|logit| in fp32.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file
from torch import nn

from auto_round.inference import QuantLinear, convert_hf_model, infer_target_device
from auto_round.packing import dequantize_gptq, pack_qweight, pack_qzeros
from auto_round.packing.awq import pack_awq_qweight, pack_awq_qzeros
from auto_round.quant.int_qdq import quantize_weight_rtn

GPTQ, PLAIN, AWQ = "auto_round:auto_gptq", "auto_round", "auto_round:auto_awq"
LOGIT_RTOL = 1e-4  # of max |logit|, fp32


# ----------------------------------------------------------------------------- helpers


def tiny_llama(hidden: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _is_conv1d(m: nn.Module) -> bool:
    return isinstance(m, tf.pytorch_utils.Conv1D)


def _layer_scheme(name: str, in_block: bool, base: dict, extra: dict) -> Optional[dict]:
    """Scheme of one layer following the checkpoint rules (exact name wins over regex), None = float."""
    override = extra.get(name)
    if override is None:
        override = next((v for k, v in extra.items() if k not in (name,) and re.search(k, name)), None)
    if override is None and not in_block:
        return None
    scheme = {**base, **(override or {})} if in_block else {**base, **override}
    return scheme if scheme["bits"] < 16 else None


def write_checkpoint(model: nn.Module, directory: Path, *, bits: int, group_size: int, sym: bool,
                     packing: Optional[str] = None, blocks: str = "model.layers",
                     extra_config: Optional[dict] = None, scale_dtype: torch.dtype = torch.float16,
                     gptq: bool = False) -> tuple[nn.Module, dict[str, dict]]:
    """RTN-quantize `model`'s block layers, write a packed auto_round checkpoint, return the fake-quant model.

    scale_dtype: dtype of the stored scales (fp32 is written with "scale_dtype": "torch.float32", as the exporter
    does). gptq=True writes a GPTQ v1 checkpoint instead (quant_method "gptq", g_idx tensors, no block names).
    Returns (fake-quantized copy of model, {layer name: scheme}) for the layers that were quantized.
    """
    extra = extra_config or {}
    base = {"bits": bits, "group_size": group_size, "sym": sym, "data_type": "int"}
    packing = packing or (GPTQ if sym else PLAIN)
    fake = copy.deepcopy(model)
    state = {k: v.clone().contiguous() for k, v in fake.state_dict().items()}
    quantized: dict[str, dict] = {}
    for name, module in fake.named_modules():
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            continue
        in_block = any(name.startswith(b + ".") for b in blocks.split(","))
        scheme = _layer_scheme(name, in_block, base, extra)
        if scheme is None:
            continue
        weight = module.weight.t() if _is_conv1d(module) else module.weight  # [out, in]
        w_hat, res, layout = quantize_weight_rtn(weight.detach(), scheme["bits"], scheme["group_size"], scheme["sym"],
                                                 scale_dtype=scale_dtype)
        with torch.no_grad():
            module.weight.copy_(w_hat.t() if _is_conv1d(module) else w_hat)
        codes = layout.from_groups(res.q).round().to(torch.int64)  # [out, in]
        zeros = res.zero_point.round().to(torch.int64).t().contiguous()  # [n_groups, out]
        scales = res.scale.t().contiguous().to(scale_dtype)  # exact: scale values are representable in scale_dtype
        del state[f"{name}.weight"]
        if packing == AWQ:
            state[f"{name}.qweight"] = pack_awq_qweight(codes, scheme["bits"])
            state[f"{name}.qzeros"] = pack_awq_qzeros(zeros, scheme["bits"])
        else:
            state[f"{name}.qweight"] = pack_qweight(codes, scheme["bits"])
            state[f"{name}.qzeros"] = pack_qzeros(zeros, scheme["bits"], zero_offset=1 if packing == GPTQ else 0)
        state[f"{name}.scales"] = scales
        if gptq:
            state[f"{name}.g_idx"] = (torch.arange(layout.in_features) // layout.group).to(torch.int32)
        quantized[name] = scheme
    # tied tensors (GPT-2 lm_head = wte) are written once; transformers re-ties them on load
    seen, unique = set(), {}
    for key, tensor in fake.state_dict().items():
        ptr = tensor.data_ptr()
        if key in state and ptr in seen:
            continue
        seen.add(ptr)
        if key in state:
            unique[key] = state[key]
    unique.update({k: v for k, v in state.items() if k not in fake.state_dict()})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(unique, str(directory / "model.safetensors"), metadata={"format": "pt"})
    qconfig: dict[str, Any] = {"autoround_version": "0.9.0", "quant_method": "auto-round", "packing_format": packing,
                               "block_name_to_quantize": blocks, **base}
    if extra:
        qconfig["extra_config"] = extra
    if scale_dtype != torch.float16:
        qconfig["scale_dtype"] = str(scale_dtype)
    if gptq:
        qconfig = {"quant_method": "gptq", "checkpoint_format": "gptq", "desc_act": False, "true_sequential": True,
                   "bits": bits, "group_size": group_size, "sym": sym}
    config = copy.deepcopy(model.config)
    config.quantization_config = qconfig
    config.save_pretrained(str(directory))
    return fake, quantized


def ids(n: int = 2, seqlen: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(ids()).logits.float()


def load(directory: Path, **kwargs) -> nn.Module:
    model, info = tf.AutoModelForCausalLM.from_pretrained(str(directory), output_loading_info=True, **kwargs)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    return model.eval()


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, rtol: float = LOGIT_RTOL) -> None:
    atol = rtol * want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= atol, f"max |logit diff| {err:.3g} > {atol:.3g}"


def assert_layers(model: nn.Module, quantized: dict[str, dict]) -> None:
    for name, module in model.named_modules():
        if name in quantized:
            assert isinstance(module, QuantLinear), name
            assert module.bits == quantized[name]["bits"], name
        elif name and (type(module) is nn.Linear or _is_conv1d(module)):
            pass  # float layer, kept as is
        else:
            assert not isinstance(module, QuantLinear), name


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_from_pretrained_matches_fake_quant(tmp_path, bits, group_size, sym):
    model = tiny_llama()
    fake, quantized = write_checkpoint(model, tmp_path, bits=bits, group_size=group_size, sym=sym)
    assert len(quantized) == 14  # 7 Linear layers x 2 blocks; lm_head stays float
    loaded = load(tmp_path)
    assert_layers(loaded, quantized)
    assert isinstance(loaded.lm_head, nn.Linear)
    assert_logits_close(logits(loaded), logits(fake))


@pytest.mark.parametrize("bits,sym", [(4, True), (2, False), (8, False)])
def test_ragged_last_group(tmp_path, bits, sym):
    model = tiny_llama(hidden=96)  # in_features 96 with group 64 -> groups of 64 and 32
    fake, quantized = write_checkpoint(model, tmp_path, bits=bits, group_size=64, sym=sym)
    loaded = load(tmp_path)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.scales.shape == (2, 96)
    assert_logits_close(logits(loaded), logits(fake))


def test_asym_4bit_awq_packing(tmp_path):
    fake, quantized = write_checkpoint(tiny_llama(), tmp_path, bits=4, group_size=32, sym=False, packing=AWQ)
    loaded = load(tmp_path)
    assert_layers(loaded, quantized)
    assert loaded.model.layers[0].mlp.up_proj.qweight.shape == (64, 128 * 4 // 32)
    assert_logits_close(logits(loaded), logits(fake))


def test_extra_config_overrides(tmp_path):
    extra = {
        "model.layers.0.self_attn.k_proj": {"bits": 16, "data_type": "fp"},
        "model.layers.1.mlp.down_proj": {"bits": 8},
        r".*gate_proj.*": {"group_size": -1},
        r".*o_proj": {"bits": 2},  # regex ...
        "model.layers.1.self_attn.o_proj": {"bits": 3},  # ... but an exact name wins
        "lm_head": {"bits": 4, "group_size": 32, "sym": True, "data_type": "int"},
    }
    fake, quantized = write_checkpoint(tiny_llama(), tmp_path, bits=4, group_size=32, sym=True, extra_config=extra)
    assert "model.layers.0.self_attn.k_proj" not in quantized and "lm_head" in quantized
    loaded = load(tmp_path)
    assert_layers(loaded, quantized)
    k_proj = loaded.model.layers[0].self_attn.k_proj
    assert type(k_proj) is nn.Linear and k_proj.weight.dtype == torch.float32
    assert loaded.model.layers[1].mlp.down_proj.bits == 8
    assert loaded.model.layers[1].mlp.down_proj.qweight.shape == (128 * 8 // 32, 64)
    assert loaded.model.layers[0].mlp.gate_proj.scales.shape == (1, 128)
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.bits == 4
    assert loaded.model.layers[0].self_attn.o_proj.bits == 2 and loaded.model.layers[1].self_attn.o_proj.bits == 3
    assert_logits_close(logits(loaded), logits(fake))


def test_gpt2_conv1d_blocks(tmp_path):
    fake, quantized = write_checkpoint(tiny_gpt2(), tmp_path, bits=4, group_size=32, sym=True, blocks="transformer.h")
    assert len(quantized) == 8  # c_attn, c_proj, c_fc, mlp.c_proj x 2
    loaded = load(tmp_path)
    assert_layers(loaded, quantized)
    assert loaded.transformer.h[0].attn.c_attn.out_features == 192
    assert_logits_close(logits(loaded), logits(fake))


def test_bias_is_loaded(tmp_path):
    model = tiny_llama()
    model.config.attention_bias = True
    model = tf.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    fake, _ = write_checkpoint(model, tmp_path, bits=4, group_size=32, sym=False)
    loaded = load(tmp_path)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert q_proj.bias is not None and torch.equal(q_proj.bias, fake.model.layers[0].self_attn.q_proj.bias)
    assert_logits_close(logits(loaded), logits(fake))


def test_loaded_buffers_keep_checkpoint_dtypes(tmp_path):
    write_checkpoint(tiny_llama(), tmp_path, bits=4, group_size=32, sym=True)
    layer = load(tmp_path).model.layers[0].self_attn.o_proj
    assert layer.qweight.dtype == torch.int32 and layer.qzeros.dtype == torch.int32
    assert layer.scales.dtype == torch.float16  # not cast to the fp32 model dtype


def test_fp32_scales(tmp_path):
    fake, _ = write_checkpoint(tiny_llama(), tmp_path, bits=4, group_size=32, sym=False, scale_dtype=torch.float32)
    loaded = load(tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.scales.dtype == torch.float32  # not rounded to fp16 on load
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, fake.model.layers[0].mlp.up_proj.weight)
    assert_logits_close(logits(loaded), logits(fake))


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # transformers' note on merging configs
def test_gptq_checkpoint_through_auto_round_config(tmp_path):
    fake, quantized = write_checkpoint(tiny_llama(), tmp_path, bits=4, group_size=32, sym=True, gptq=True)
    loaded = load(tmp_path, quantization_config=tf.AutoRoundConfig())
    assert_layers(loaded, quantized)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert q_proj.zero_offset == 1 and q_proj.g_idx is not None
    assert_logits_close(logits(loaded), logits(fake))


def test_disk_offload_device_map(tmp_path):
    fake, _ = write_checkpoint(tiny_llama(), tmp_path / "ckpt", bits=4, group_size=32, sym=False)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    loaded = load(tmp_path / "ckpt", device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert_logits_close(logits(loaded), logits(fake))


def test_bf16_load(tmp_path):
    fake, _ = write_checkpoint(tiny_llama(), tmp_path, bits=4, group_size=32, sym=True)
    loaded = load(tmp_path, dtype=torch.bfloat16)
    with torch.no_grad():
        got = loaded(ids()).logits
    assert got.dtype == torch.bfloat16
    want = logits(fake.to(torch.bfloat16))
    assert_logits_close(got.float(), want, rtol=5e-2)  # bf16 rounding of activations


def test_save_pretrained_round_trip(tmp_path):
    fake, _ = write_checkpoint(tiny_llama(), tmp_path / "a", bits=3, group_size=32, sym=False)
    loaded = load(tmp_path / "a")
    loaded.save_pretrained(str(tmp_path / "b"))
    saved = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert saved["packing_format"] == PLAIN and saved["bits"] == 3
    again = load(tmp_path / "b")
    assert torch.equal(again.model.layers[1].mlp.up_proj.qweight, loaded.model.layers[1].mlp.up_proj.qweight)
    assert_logits_close(logits(again), logits(fake))


@pytest.mark.parametrize("bits,group_size,sym,in_features", [(4, 32, True, 64), (3, 32, False, 96), (8, -1, False, 64),
                                                             (2, 64, True, 96)])
def test_quant_linear_dequantizes_exactly(bits, group_size, sym, in_features):
    torch.manual_seed(bits)
    out_features = 64
    weight = torch.randn(out_features, in_features)
    w_hat, res, layout = quantize_weight_rtn(weight, bits, group_size, sym)
    codes = layout.from_groups(res.q).round().to(torch.int64)
    zeros = res.zero_point.round().to(torch.int64).t().contiguous()
    offset = 1 if sym else 0
    qweight, qzeros = pack_qweight(codes, bits), pack_qzeros(zeros, bits, zero_offset=offset)
    scales = res.scale.t().contiguous().half()

    layer = QuantLinear(in_features, out_features, bits, group_size, zero_offset=offset, bias=False)
    assert layer.qweight.shape == qweight.shape and layer.qzeros.shape == qzeros.shape
    assert layer.scales.shape == scales.shape
    layer.qweight.copy_(qweight)
    layer.qzeros.copy_(qzeros)
    layer.scales.copy_(scales)
    layer.post_init()
    deq = layer.dequantize(torch.float32)
    ref = dequantize_gptq(qweight, qzeros, scales, bits, group_size, in_features, zero_offset=offset)
    assert torch.equal(deq, ref)
    assert torch.equal(deq, w_hat)
    x = torch.randn(3, in_features)
    torch.testing.assert_close(layer(x), x @ w_hat.t())


def test_infer_target_device():
    assert infer_target_device(None) == "cpu"
    assert infer_target_device("cpu") == "cpu"
    assert infer_target_device({"": "cpu"}) == "cpu"
    assert infer_target_device({"model": "cpu", "lm_head": "disk"}) == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert infer_target_device("auto") == expected
    assert infer_target_device(0) == expected


def test_unsupported_configs_raise_clear_errors():
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": True,
                                        "packing_format": "auto_round:llm_compressor", "data_type": "int"}
    with pytest.raises(NotImplementedError, match="llm_compressor"):
        convert_hf_model(model, "cpu")
    model.config.quantization_config = {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": True,
                                        "packing_format": "auto_round:auto_gptq", "data_type": "nv_fp"}
    with pytest.raises(NotImplementedError, match="nv_fp"):
        convert_hf_model(model, "cpu")


def test_gptq_config_is_accepted():
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                                        "desc_act": False}
    model, backends = convert_hf_model(model, "cpu")
    assert backends and isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert model.model.layers[0].self_attn.q_proj.zero_offset == 1
    assert isinstance(model.lm_head, nn.Linear)


def _filled_layer(bits, group_size, sym, in_features, out_features=64, bias=False, seed=0, dtype=None):
    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features)
    w_hat, res, layout = quantize_weight_rtn(weight, bits, group_size, sym)
    codes = layout.from_groups(res.q).round().to(torch.int64)
    zeros = res.zero_point.round().to(torch.int64).t().contiguous()
    offset = 1 if sym else 0
    layer = QuantLinear(in_features, out_features, bits, group_size, zero_offset=offset, bias=bias, dtype=dtype)
    layer.qweight.copy_(pack_qweight(codes, bits))
    layer.qzeros.copy_(pack_qzeros(zeros, bits, zero_offset=offset))
    layer.scales.copy_(res.scale.t().contiguous().half())
    if bias:
        layer.bias.copy_(torch.randn(out_features))
    return layer, w_hat


@pytest.mark.parametrize("group_size,sym,in_features,bias", [(32, True, 64, False), (128, True, 576, True),
                                                             (64, False, 192, False), (256, False, 512, True)])
def test_int4_cpu_kernel_matches_the_fake_quant_weight(group_size, sym, in_features, bias):
    """bf16 layers: the int4 kernel (ragged last group zero-padded) computes x @ W_hat^T + b like the float path.

    Reference: the fake-quant weight and the input rounded to bf16, product in fp64; the kernel accumulates in
    fp32 and rounds its output to bf16, so the tolerance is a few bf16 ulps of the output's scale.
    """
    layer, w_hat = _filled_layer(4, group_size, sym, in_features, bias=bias, dtype=torch.bfloat16)
    layer.post_init()
    assert layer.kernel == "int4_cpu" and layer.weight.numel() == 0  # no float copy of the weight is kept
    x = torch.randn(2, 5, in_features).bfloat16()
    bias_term = layer.bias.double() if bias else 0
    expected = x.double() @ w_hat.double().t() + bias_term
    tol = 2 ** -7 * float(expected.abs().max())
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)
    layer.post_init(use_int4_kernel=False)
    assert layer.kernel == "dequant"
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("bits,group_size,dtype", [(2, 32, torch.bfloat16), (3, 32, torch.bfloat16),
                                                   (8, 32, torch.bfloat16), (4, -1, torch.bfloat16),
                                                   (4, 48, torch.bfloat16), (4, 32, torch.float32)])
def test_int4_kernel_is_not_used_where_it_does_not_apply(bits, group_size, dtype):
    """Other widths, group sizes the kernel lacks, and fp32 models (exact path) keep the float weight."""
    layer, w_hat = _filled_layer(bits, group_size, True, 96, dtype=torch.float32)
    layer.dtype = dtype
    layer.post_init()
    assert layer.kernel == "dequant"
    layer.dtype = torch.float32
    layer.post_init()
    layer.post_init()
    assert layer.kernel == "dequant"
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), x @ w_hat.t())
