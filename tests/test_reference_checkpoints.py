"""Compatibility with checkpoints the reference (auto-round 0.16.1) writes: golden fixtures made by
tests/fixtures/make_reference_fixtures.py in the reference's own venv.

1. Every quantized export of the reference loads in our loader and gives the logits of the reference's own
   `fake` export (its fake-quantized model) of the same run. Tolerance 1e-4 * (1 + max|logit|) in fp32
   for auto_round and llm_compressor; GPTQ / AWQ files keep their float tensors in fp16, so there the fake
   model's float tensors are rounded to fp16 first, and 1e-3 covers the reference's own fp16 rounding of
   biases / norms it may do differently.
2. Our export of the same scheme has the reference's tensor names, dtypes and shapes, and the same
   quantization_config keys (values compared for the scheme keys).
"""

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open

from auto_round import AutoRound

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
CASES = sorted(p for p in FIXTURES.glob("*") if (p / "case.json").is_file())
FP16_FORMATS = ("auto_gptq", "auto_awq")
pytestmark = pytest.mark.skipif(not CASES, reason="no reference fixtures (tests/fixtures/make_reference_fixtures.py)")


def case_formats():
    for case in CASES:
        meta = json.loads((case / "case.json").read_text())
        for fmt in meta["formats"]:
            if fmt != "fake":
                yield pytest.param(case, fmt, id=f"{case.name}-{fmt}")


def export_dir(case: Path, fmt: str) -> Path:
    return case / "out" / fmt.replace(":", "-")


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


def load(path: Path, fmt: str) -> torch.nn.Module:
    kw = {"quantization_config": tf.AutoRoundConfig()} if fmt in FP16_FORMATS else {}
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def fake_logits(case: Path, round_fp16: set[str] | None = None) -> torch.Tensor:
    model = tf.AutoModelForCausalLM.from_pretrained(export_dir(case, "fake"), dtype=torch.float32).eval()
    if round_fp16:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in round_fp16:
                    p.copy_(p.half().float())
    with torch.no_grad():
        return model(input_ids=ids()).logits


@pytest.mark.parametrize("case,fmt", list(case_formats()))
def test_reference_exports_load_with_the_reference_fake_logits(case, fmt):
    path = export_dir(case, fmt)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored_float = {k for k in f.keys() if f.get_slice(k).get_dtype() in ("F16", "BF16", "F32")}
    model = load(path, fmt)
    with torch.no_grad():
        got = model(input_ids=ids()).logits
    if fmt in FP16_FORMATS:  # the fake model's float tensors as the fp16 file stores them (not the packed ones)
        want = fake_logits(case, {k for k in stored_float if not k.endswith(".scales")})
        rtol = 1e-3
    else:
        want, rtol = fake_logits(case), 1e-4
    assert (got - want).abs().max().item() <= rtol * (1 + want.abs().max().item())


def layout(path: Path) -> dict[str, tuple[str, tuple]]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


def tiny_llama(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=260, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            tie_word_embeddings=False, bos_token_id=256, eos_token_id=256, pad_token_id=257)
    return tf.LlamaForCausalLM(config).eval()


SCHEME_KEYS = ("bits", "group_size", "sym", "quant_method", "packing_format", "zero_point", "version", "desc_act")


@pytest.mark.parametrize("case,fmt", [p for p in case_formats() if "ragged" not in p.id and "tuned" not in p.id])
def test_our_export_has_the_reference_layout(tmp_path, case, fmt):
    meta = json.loads((case / "case.json").read_text())
    ar = AutoRound(tiny_llama(meta["hidden"]), scheme="W4A16", group_size=meta["group_size"], sym=meta["sym"],
                   iters=0, disable_opt_rtn=True)
    ours = ar.quantize_and_save(tmp_path / fmt, format=fmt)[1][0]
    theirs = export_dir(case, fmt)
    assert layout(ours) == layout(theirs)
    q_ours = json.loads((ours / "config.json").read_text())["quantization_config"]
    q_theirs = json.loads((theirs / "config.json").read_text())["quantization_config"]
    for key in SCHEME_KEYS:
        assert q_ours.get(key) == q_theirs.get(key), key
    # keys only the reference writes: its version stamp and its model-free RTN marker
    allowed_extra = {"autoround_version", "model_free", "iters", "enable_quanted_input"}
    assert set(q_theirs) - set(q_ours) <= allowed_extra, set(q_theirs) - set(q_ours)
