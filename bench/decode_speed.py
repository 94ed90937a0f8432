"""Prefill and greedy-decode speed of one checkpoint on CPU. Imports only torch + transformers.

    PYTHON bench/decode_speed.py DIR [--prompt_tokens 256] [--new_tokens 64] [--threads N]

Run it with the interpreter whose auto_round should load the checkpoint: ours (.venv) or the reference
(.venv-peer, from a cwd outside the repo so that `import auto_round` finds the reference). Prints one JSON
line: prefill tokens/s (one forward of the prompt), decode tokens/s (greedy, KV cache, fixed number of new
tokens, prefill excluded), both the best of `--repeats` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


@torch.inference_mode()
def measure(model, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, prompt_tokens), generator=gen)
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                  pad_token_id=0, eos_token_id=None)
    model.generate(ids[:, :16], **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
    prefill, total = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids)
        prefill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.generate(ids, **kwargs)
        total.append(time.perf_counter() - t0)
    best_prefill, best_total = min(prefill), min(total)
    return {"prefill_tok_s": prompt_tokens / best_prefill,
            "decode_tok_s": new_tokens / max(best_total - best_prefill, 1e-9)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--prompt_tokens", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the loaded model (bf16 lets our 4-bit layers use the int4 kernel)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.path, dtype=getattr(torch, args.dtype)).eval()
    load_s = time.perf_counter() - t0
    result = measure(model, args.prompt_tokens, args.new_tokens, args.repeats)
    print(json.dumps({**result, "load_s": load_s, "threads": torch.get_num_threads(), "dtype": args.dtype}))


if __name__ == "__main__":
    main()
