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


def load_llama(path: "str | Path", n_ctx: int, n_threads: "int | None" = None):
    """A llama_cpp.Llama for `path` that keeps the logits of every position."""
    try:
        import llama_cpp
    except ImportError as err:
        raise EvalError("scoring a GGUF file with llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from err
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                           n_threads=n_threads or torch.get_num_threads())


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
