"""quantize -> save auto_round -> transformers.from_pretrained -> same logits as the fake-quantized model.

Tolerance: the reloaded model dequantizes the same integers with the same fp16 scales, so in fp32 the
logits agree to float rounding of a different matmul order: |diff| <= 1e-4 * (1 + max|logit|).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from auto_round import AutoRound
from auto_round.inference.qlinear import QuantLinear
from tiny_models import CONFIGS, random_ids, tiny_model


def assert_logits_close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = 1e-4 * (1 + a.abs().max().item())
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max |logit diff| {diff:.3g} > {tol:.3g}"


def roundtrip(tmp_path, arch, **kw):
    model = tiny_model(arch)
    ar = AutoRound(model, dataset=random_ids(8, 16), nsamples=8, seqlen=16, batch_size=4,
                   low_cpu_mem_usage=False,  # keep the fake-quantized model to compare against
                   **{"iters": 3, "group_size": 32, **kw})
    out = tmp_path / arch
    ar.quantize_and_save(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(2, 12, seed=1)
    with torch.no_grad():
        fake = ar.model(input_ids=ids).logits
        real = reloaded(input_ids=ids).logits
    return ar, reloaded, fake, real


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_architecture_reloads_with_same_logits(tmp_path, arch):
    ar, reloaded, fake, real = roundtrip(tmp_path, arch)
    n_quant = sum(isinstance(m, QuantLinear) for m in reloaded.modules())
    assert n_quant == len(ar.results) > 0
    assert_logits_close(fake, real)


@pytest.mark.parametrize("bits,sym", [(4, False), (2, True), (3, True), (8, True), (2, False)])
def test_bits_and_asym_reload(tmp_path, bits, sym):
    _, _, fake, real = roundtrip(tmp_path, "llama", bits=bits, sym=sym)
    assert_logits_close(fake, real)


def test_ragged_groups_and_mixed_layers_reload(tmp_path):
    layer_config = {"model.layers.0.mlp.down_proj": {"bits": 8}, "o_proj": {"bits": 16}}
    ar, reloaded, fake, real = roundtrip(tmp_path, "llama", group_size=48, layer_config=layer_config)  # 64 % 48 != 0
    assert_logits_close(fake, real)
    assert not isinstance(reloaded.get_submodule("model.layers.1.self_attn.o_proj"), QuantLinear)
    assert reloaded.get_submodule("model.layers.0.mlp.down_proj").bits == 8


def test_rtn_reload(tmp_path):
    _, _, fake, real = roundtrip(tmp_path, "qwen3", iters=0)
    assert_logits_close(fake, real)


def test_amp_bf16_tuning_lowers_block_loss_and_reloads(tmp_path):
    """amp=True runs the tuning matmuls under bf16 autocast; the result is still a valid fp32 checkpoint."""
    ar, _, fake, real = roundtrip(tmp_path, "llama", iters=20, lr=5e-3, amp=True)
    assert ar.tuning.amp_dtype == torch.bfloat16
    assert all(s.loss_best < s.loss_first for s in ar.block_stats.values())
    assert_logits_close(fake, real)


def test_amp_dtype_must_be_a_half_type():
    with pytest.raises(ValueError, match="amp_dtype"):
        AutoRound(tiny_model("llama"), amp=True, amp_dtype="fp32", iters=0)


def test_amp_default_follows_the_hardware():
    from auto_round.runtime import fast_bf16

    auto = AutoRound(tiny_model("llama"), iters=1, device="cpu", dataset=random_ids(2, 8))
    assert auto.tuning.amp_dtype == (torch.bfloat16 if fast_bf16("cpu") else None)
    assert AutoRound(tiny_model("llama"), iters=1, amp=False, dataset=random_ids(2, 8)).tuning.amp_dtype is None
