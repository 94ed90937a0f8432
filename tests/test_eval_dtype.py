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
