"""`make demo`: quantize SmolLM2-135M-Instruct on CPU, reload the export through transformers, compare.

Steps: convert the bundled GGUF to an fp32 HF folder (once, cached), measure fp32 perplexity on held-out
Wikipedia text, run SignRound with a CPU-sized recipe, save the auto_round checkpoint, load it back with
plain `AutoModelForCausalLM.from_pretrained`, and print fp vs quantized perplexity plus a generation.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from auto_round import AutoRound
from auto_round.eval.perplexity import generate_text, perplexity
from auto_round.model.assets import smollm2_path
from auto_round.model.offline_text import calibration_texts, heldout_texts

PROMPT = "The theory of relativity was developed by"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_samples", type=int, default=8, help="windows of 512 held-out tokens")
    p.add_argument("--output_dir", default="out/smollm2-demo")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    src = smollm2_path()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    texts = heldout_texts()
    ppl_fp = perplexity(model, tok, texts, seqlen=512, nsamples=args.eval_samples)
    print(f"fp32 perplexity (held-out Wikipedia, {args.eval_samples}x512 tokens): {ppl_fp:.3f}")

    # round-to-nearest on the same scheme: the baseline SignRound has to beat (fake-quantized in memory)
    rtn = AutoRound(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), tok,
                    scheme=args.scheme, iters=0, disable_opt_rtn=True)
    rtn.quantize()
    ppl_rtn = perplexity(rtn.model, tok, texts, seqlen=512, nsamples=args.eval_samples)
    print(f"{args.scheme} RTN perplexity: {ppl_rtn:.3f}")
    del rtn

    t1 = time.perf_counter()
    ar = AutoRound(model, tok, scheme=args.scheme, iters=args.iters, lr=args.lr, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=args.batch_size, dataset=calibration_texts())
    _, paths = ar.quantize_and_save(args.output_dir, format="auto_round", overwrite=True)
    t_quant = time.perf_counter() - t1
    del model, ar

    qmodel = AutoModelForCausalLM.from_pretrained(paths[0]).eval()
    ppl_q = perplexity(qmodel, tok, texts, seqlen=512, nsamples=args.eval_samples)
    size = sum(f.stat().st_size for f in Path(paths[0]).glob("*.safetensors")) / 2**20
    print()
    print(f"| model | perplexity | size |")
    print(f"|---|---|---|")
    print(f"| fp32 | {ppl_fp:.3f} | {sum(f.stat().st_size for f in Path(src).glob('*.safetensors')) / 2**20:.0f} MiB |")
    print(f"| {args.scheme} RTN (iters 0), fake-quantized | {ppl_rtn:.3f} | |")
    print(f"| {args.scheme} SignRound ({args.iters} iters), reloaded via transformers | {ppl_q:.3f} | {size:.0f} MiB |")
    print(f"\nquantize + save: {t_quant:.0f} s; total demo: {time.perf_counter() - t0:.0f} s")
    print(f"\nprompt: {PROMPT!r}\nquantized model: {generate_text(qmodel, tok, PROMPT, max_new_tokens=30)!r}")


if __name__ == "__main__":
    main()
