"""SignRound vs RTN on SmolLM2-135M-Instruct, same calibration data, held-out Wikipedia perplexity.

    .venv/bin/python bench/signround_vs_rtn.py --schemes W2A16G64 W3A16G64 W4A16

For each scheme: RTN (iters 0) and SignRound (CPU recipe: 50 iters, lr 5e-3, 32 x 256-token samples of
the bundled calibration articles 0-79), both evaluated on 8 windows x 512 tokens of the held-out
articles 80-106. Writes `bench/results/signround_vs_rtn.{json,md}` with perplexities, wall time and the
per-block loss (first iteration -> best).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from auto_round import AutoRound
from auto_round.eval import perplexity
from auto_round.model.assets import smollm2_path
from auto_round.model.offline_text import calibration_texts, heldout_texts

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["W2A16G64", "W3A16G64"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_samples", type=int, default=8)
    p.add_argument("--name", default="signround_vs_rtn", help="results file stem")
    return p.parse_args()


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_one(path: Path, tok, scheme: str, iters: int, args, calib, heldout) -> dict:
    t0 = time.perf_counter()
    ar = AutoRound(load(path), tok, scheme=scheme, iters=iters, lr=args.lr if iters else None, disable_opt_rtn=True,
                   nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, dataset=calib)
    ar.quantize()
    seconds = time.perf_counter() - t0
    ppl = perplexity(ar.model, tok, heldout, seqlen=512, nsamples=args.eval_samples)
    blocks = {name: {"loss_first": s.loss_first, "loss_best": s.loss_best, "best_iter": s.best_iter}
              for name, s in ar.block_stats.items()}
    return {"scheme": scheme, "iters": iters, "ppl": ppl, "quantize_s": seconds, "blocks": blocks}


def markdown(fp_ppl: float, rows: list[dict], args) -> str:
    lines = [f"# SignRound vs RTN, SmolLM2-135M-Instruct (fp32 held-out ppl {fp_ppl:.2f})", "",
             f"calibration: {args.nsamples} x {args.seqlen} tokens (bundled Wikipedia 0-79); "
             f"eval: {args.eval_samples} x 512 tokens (articles 80-106); SignRound: {args.iters} iters, "
             f"lr {args.lr}, batch {args.batch_size}; machine: {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}", "",
             "| scheme | RTN ppl | SignRound ppl | SignRound time (s) | mean block loss first -> best |",
             "|---|---|---|---|---|"]
    by_scheme: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_scheme.setdefault(row["scheme"], {})[row["iters"]] = row
    for scheme, pair in by_scheme.items():
        rtn, sr = pair.get(0), pair.get(args.iters)
        if not (rtn and sr):
            continue
        first = sum(b["loss_first"] for b in sr["blocks"].values()) / len(sr["blocks"])
        best = sum(b["loss_best"] for b in sr["blocks"].values()) / len(sr["blocks"])
        lines.append(f"| {scheme} | {rtn['ppl']:.2f} | {sr['ppl']:.2f} | {sr['quantize_s']:.0f} | "
                     f"{first:.4g} -> {best:.4g} |")
    for row in rows:
        if row["iters"]:
            lines += ["", f"## {row['scheme']} per-block loss (first iteration -> best)", "",
                      "| block | first | best | best iter |", "|---|---|---|---|"]
            lines += [f"| {name} | {b['loss_first']:.4g} | {b['loss_best']:.4g} | {b['best_iter']} |"
                      for name, b in row["blocks"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    calib, heldout = calibration_texts(), heldout_texts()
    fp_ppl = perplexity(load(path), tok, heldout, seqlen=512, nsamples=args.eval_samples)
    print(f"fp32 ppl {fp_ppl:.3f}", flush=True)
    rows = []
    for scheme in args.schemes:
        for iters in (0, args.iters):
            rows.append(run_one(path, tok, scheme, iters, args, calib, heldout))
            print(f"{scheme} iters={iters}: ppl {rows[-1]['ppl']:.3f} in {rows[-1]['quantize_s']:.0f} s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"fp_ppl": fp_ppl, "args": vars(args), "rows": rows},
                                                          indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(fp_ppl, rows, args))
    print(markdown(fp_ppl, rows, args))


if __name__ == "__main__":
    main()
