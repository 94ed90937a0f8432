"""The real SmolLM2-135M-Instruct exported to GGUF, loaded by transformers and (when installed) llama.cpp.

Tolerances. transformers dequantizes the file with gguf-py into fp32: the perplexity must equal the
fake-quantized model's to 1e-4 relative (same weights bit for bit, same kernels). llama.cpp computes
with its own kernels, which quantize the activations to 8 bits for the quantized dot products, so its
perplexity may differ by a little; we allow 3 % (measured: 0.3-0.8 %, bench/results/*-gguf-smollm2.md).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from auto_round import AutoRound
from auto_round.eval import perplexity
from auto_round.eval.llama_cpp import llama_cpp_generate, llama_cpp_perplexity, load_llama
from auto_round.eval.perplexity import token_windows
from auto_round.model.assets import smollm2_path
from auto_round.model.offline_text import calibration_texts, heldout_texts

pytestmark = pytest.mark.slow
EVAL = dict(seqlen=256, nsamples=4)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path())


def llama_cpp_ppl(path, windows: torch.Tensor) -> float:
    pytest.importorskip("llama_cpp")
    # the file's layout as written: llama.cpp's repacked q4_0 / q4_1 kernels are wrong on some CPUs (AVX-512,
    # llama-cpp-python 0.3.16: its own q4_0 file of SmolLM2 at ppl 225, 25.2 without repacking)
    llm = load_llama(path, n_ctx=windows.shape[1], repack=False)
    text = llama_cpp_generate(llm, "The capital of France is", max_tokens=8)
    assert "Paris" in text, f"llama.cpp generation is not coherent: {text!r}"
    return llama_cpp_perplexity(llm, windows)


@pytest.mark.parametrize("mix", ["q4_k_m", "q2_k_s", "q4_0", "q8_0"])
def test_smollm2_gguf_matches_fake_quant(tmp_path, tokenizer, mix):
    # q8_0 ignores the imatrix (llama.cpp's too), so it skips calibration; the others use opt-RTN, the default
    ar = AutoRound(str(smollm2_path()), scheme=f"gguf:{mix}", iters=0, dataset=calibration_texts()[:8], nsamples=8,
                   seqlen=128, low_cpu_mem_usage=False, disable_opt_rtn=mix == "q8_0")
    ar.quantize()
    fake = perplexity(ar.model, tokenizer, heldout_texts(), **EVAL)
    ar.save_quantized(tmp_path, format=f"gguf:{mix}")
    path = next(tmp_path.glob("*.gguf"))
    assert path.name.endswith(f"-{mix.upper()}.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert perplexity(loaded, tokenizer, heldout_texts(), **EVAL) == pytest.approx(fake, rel=1e-4)
    cpp = llama_cpp_ppl(path, token_windows(tokenizer, heldout_texts(), **EVAL))
    assert cpp == pytest.approx(fake, rel=0.03)
