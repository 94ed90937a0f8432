"""Score a .gguf file with llama.cpp itself (llama-cpp-python), on the same token windows as `perplexity`.

llama-cpp-python is optional (it compiles llama.cpp at install time); `import llama_cpp` failing raises
an EvalError that says how to get it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .perplexity import EvalError


def load_llama(path: "str | Path", n_ctx: int, n_threads: "int | None" = None, repack: bool = True):
    """A llama_cpp.Llama for `path` that keeps the logits of every position.

    repack=False: llama.cpp keeps the weights in their file layout instead of repacking q4_0 / q4_1 / iq4_nl
    into its interleaved CPU kernels' layout (llama-cli's --no-repack). On the AVX-512 box of 2026-12-07 the
    repacked path of llama-cpp-python 0.3.16 scores llama.cpp's own q4_0 file of SmolLM2 at ppl 225 (25.2
    without repacking) and 0.3.36 crashes; Llama() has no keyword for it, so the model params default is
    wrapped while the model loads."""
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as low_level
    except ImportError as err:
        raise EvalError("scoring a GGUF file with llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from err
    default_params = low_level.llama_model_default_params
    if not repack:
        if "use_extra_bufts" not in [f[0] for f in default_params()._fields_]:
            raise EvalError(f"llama-cpp-python {llama_cpp.__version__} has no repack switch (use_extra_bufts)")

        def without_repack():
            params = default_params()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = without_repack
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                               n_threads=n_threads or torch.get_num_threads())
    finally:
        low_level.llama_model_default_params = default_params


def llama_cpp_perplexity(llm, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) of llama.cpp's logits over windows [n, T] (each window scored alone)."""
    nll, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)  # [T-1, vocab]
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    llm.reset()
    return math.exp(nll / count)


def llama_cpp_generate(llm, prompt: str, max_tokens: int = 24) -> str:
    """Greedy continuation of `prompt` by llama.cpp (its own tokenizer)."""
    llm.reset()
    return llm(prompt, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"]
