"""Perplexity over fixed token windows, and a short greedy generation, for any causal LM."""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["EvalError", "token_windows", "perplexity", "generate_text"]


class EvalError(ValueError):
    """The evaluation cannot run as asked (e.g. the text is too short for the requested windows)."""


def token_windows(tokenizer, texts: Sequence[str], *, seqlen: int, nsamples: int) -> torch.Tensor:
    """Join `texts` with blank lines, tokenize once, and cut `nsamples` windows of `seqlen` ids.

    The windows are spread evenly over the whole token stream (window i starts at
    floor(i * (N - seqlen) / (nsamples - 1))) rather than taken from its head, so a held-out set of many
    articles is scored on all of them and not only on the first one. Windows never overlap: the text must
    hold at least nsamples*seqlen tokens. Returns a LongTensor [nsamples, seqlen]. No special tokens are
    added, so the windows are the same whatever the tokenizer's BOS setting.
    """
    if seqlen < 2 or nsamples < 1:
        raise EvalError(f"need seqlen >= 2 and nsamples >= 1, got seqlen={seqlen}, nsamples={nsamples}")
    if isinstance(texts, str):
        texts = [texts]
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    needed = seqlen * nsamples
    if ids.numel() < needed:
        raise EvalError(f"the evaluation text has {ids.numel()} tokens, fewer than nsamples*seqlen = "
                        f"{nsamples}*{seqlen} = {needed}; give more text or fewer/shorter windows")
    last_start = ids.numel() - seqlen
    starts = [i * last_start // (nsamples - 1) for i in range(nsamples)] if nsamples > 1 else [0]
    return torch.stack([ids[s:s + seqlen] for s in starts])


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[str], *, seqlen: int = 512,
               nsamples: int = 8, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over `nsamples` windows of `seqlen` tokens (seqlen-1 predictions each).

    Every window is scored independently (no context carried across windows), in batches of `batch_size`.
    Logits are upcast to fp32 before the log-softmax so a bf16/fp16 model is scored at full precision.
    """
    windows = token_windows(tokenizer, texts, seqlen=seqlen, nsamples=nsamples)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, nsamples, max(1, batch_size)):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="sum")
        total_nll += nll.item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 30) -> str:
    """Greedy continuation of `prompt` (the new text only, special tokens stripped)."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
