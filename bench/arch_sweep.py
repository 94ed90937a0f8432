"""Architecture sweep: quantize a tiny random model of many transformers architectures and reload every export.

    .venv/bin/python bench/arch_sweep.py [ARCH,ARCH,...] [SCHEME,SCHEME,...] [FORMATS]

For each architecture (default: all below) and scheme (default W4A16G32): SignRound 2 iterations on random
tokens, export to FORMATS (default auto_round,auto_gptq,auto_awq,llm_compressor,fake), reload each folder through
`load_for_eval` (what `auto-round eval` / `--eval_ppl` use) and compare its logits with the in-memory fake-quantized
model: OK when max |diff| / max |logit| < 2e-3. Exports that load in bf16 only (MX / NVFP4 compressed-tensors)
print BF16 and the difference from the fake model run in bf16, unjudged: with 4-bit activations it is 0.1-0.3 on
these random two-layer models for Llama too (the fake model alone moves that much between fp32 and bf16); with
act_bits=16 it is < 1e-2. Prints one line per export; a crash or failed reload says why.
The architectures the test suite covers are in tests/tiny_models.py; this reaches further, at minutes per run.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
import transformers as tf  # noqa: E402

from auto_round import AutoRound  # noqa: E402
from auto_round.eval.lm_eval_runner import load_for_eval  # noqa: E402
from tiny_models import random_ids, tiny_tokenizer  # noqa: E402

V = 260
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
              max_position_embeddings=128)
_GQA = dict(_SMALL, num_key_value_heads=2)
CONFIGS = {
    "phi3": lambda: tf.Phi3Config(pad_token_id=0, **_GQA),
    "bloom": lambda: tf.BloomConfig(vocab_size=V, hidden_size=64, n_layer=2, n_head=4),
    "falcon": lambda: tf.FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      new_decoder_architecture=True, num_kv_heads=2),
    "falcon_mqa": lambda: tf.FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          multi_query=True, parallel_attn=True, alibi=False),
    "gptj": lambda: tf.GPTJConfig(vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128),
    "starcoder2": lambda: tf.Starcoder2Config(**_GQA),
    "gemma2": lambda: tf.Gemma2Config(head_dim=16, sliding_window=8, **_GQA),
    "gemma": lambda: tf.GemmaConfig(head_dim=16, **_GQA),
    "phi": lambda: tf.PhiConfig(**_SMALL),
    "cohere": lambda: tf.CohereConfig(**_GQA),
    "olmo": lambda: tf.OlmoConfig(pad_token_id=0, **_GQA),
    "olmo2": lambda: tf.Olmo2Config(pad_token_id=0, **_GQA),
    "granite": lambda: tf.GraniteConfig(**_GQA),
    "stablelm": lambda: tf.StableLmConfig(**_GQA),
    "gpt_bigcode": lambda: tf.GPTBigCodeConfig(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                               multi_query=True),
    "codegen": lambda: tf.CodeGenConfig(vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128,
                                        n_ctx=128),
    "mpt": lambda: tf.MptConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4,
                                           num_experts_per_tok=2, **_GQA),
    "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **_GQA),
    "exaone4": lambda: tf.Exaone4Config(head_dim=16, **_GQA),
    "smollm3": lambda: tf.SmolLM3Config(pad_token_id=0, **_GQA),
    "glm": lambda: tf.GlmConfig(head_dim=16, pad_token_id=0, **_GQA),
    "ernie4_5": lambda: tf.Ernie4_5Config(head_dim=16, **_GQA),
}


def check(arch: str, scheme: str, formats: str) -> list[str]:
    """One line per export of `arch` quantized with `scheme`: OK / MISMATCH with the relative logit error, or why
    the quantization or the reload failed."""
    ids, name, tmp = random_ids(2, 16, seed=5), f"{arch}/{scheme}", Path(tempfile.mkdtemp())
    try:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.float32).eval()
        ar = AutoRound(model, tiny_tokenizer(), scheme=scheme, iters=2, dataset=random_ids(8, 16), nsamples=8,
                       seqlen=16, disable_progress=True)
        ar.quantize()
        with torch.no_grad():
            want = ar.model(ids).logits.float()
        ar.save_quantized(str(tmp / "o"), format=formats)
    except Exception as err:  # noqa: BLE001 - a sweep reports every failure and goes on
        traceback.print_exc(limit=3)
        shutil.rmtree(tmp)
        return [f"{name:24s} CRASH {type(err).__name__}: {str(err)[:300]}"]
    outs = [tmp / "o"] if "," not in formats else sorted(p for p in (tmp / "o").iterdir() if p.is_dir())
    lines = []
    for out in outs:
        try:
            model, _ = load_for_eval(out, device="cpu")
            ref = want
            if model.dtype == torch.bfloat16:  # MX / NVFP4 compressed-tensors: against the fake model run in bf16
                with torch.no_grad():
                    ref = copy.deepcopy(ar.model).to(torch.bfloat16)(ids).logits.float()
            with torch.no_grad():
                got = model(ids).logits.float()
            d = ((got - ref).abs().max() / ref.abs().max()).item()
            verdict = "BF16" if model.dtype == torch.bfloat16 else "OK" if d < 2e-3 else "MISMATCH"
            lines.append(f"{name:24s} {out.name:15s} {verdict} {d:.5f}")
        except Exception as err:  # noqa: BLE001
            lines.append(f"{name:24s} {out.name:15s} RELOAD-FAIL {type(err).__name__}: {str(err)[:300]}")
    shutil.rmtree(tmp)
    return lines


def main() -> None:
    logging.getLogger("auto_round").setLevel(logging.ERROR)
    arches = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else list(CONFIGS)
    schemes = (sys.argv[2] if len(sys.argv) > 2 else "W4A16G32").split(",")
    formats = sys.argv[3] if len(sys.argv) > 3 else "auto_round,auto_gptq,auto_awq,llm_compressor,fake"
    for arch in arches:
        for scheme in schemes:
            for line in check(arch, scheme, formats):
                print(line, flush=True)


if __name__ == "__main__":
    main()
