"""Held-out perplexity of a checkpoint folder, loaded from disk with plain transformers (our venv).

    .venv/bin/python bench/eval_export.py DIR [--tokenizer DIR] [--nsamples 8] [--seqlen 512]

Prints one JSON line {"ppl": ..., "load_s": ..., "eval_s": ...}. Quantized folders in the auto_round
format (ours or the reference's: same format) load through transformers' AutoRound quantizer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from auto_round.eval import perplexity
from auto_round.model.offline_text import heldout_texts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.path)
    t1 = time.perf_counter()
    ppl = perplexity(model, tok, heldout_texts(), seqlen=args.seqlen, nsamples=args.nsamples)
    print(json.dumps({"ppl": ppl, "load_s": t1 - t0, "eval_s": time.perf_counter() - t1}))


if __name__ == "__main__":
    main()
