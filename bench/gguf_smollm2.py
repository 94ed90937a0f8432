"""SmolLM2-135M-Instruct to GGUF: RTN vs opt-RTN vs tuned, scored three ways.

    .venv/bin/python bench/gguf_smollm2.py                       # the default grid below
    .venv/bin/python bench/gguf_smollm2.py --runs q4_k_m:tuned --iters 200
    .venv/bin/python bench/gguf_smollm2.py --runs q5_0:opt-rtn auto=q4_0+q8_0@5.5:opt-rtn   # AutoScheme vs uniform

For every (mix, mode): quantize (RTN = llama.cpp's search without imatrix, opt-RTN = the imatrix-weighted
search, tuned = SignRound's rounding on top of the opt-RTN scales), then report held-out perplexity of
  - the fake-quantized model in memory (what the tuning produced),
  - the .gguf file loaded by transformers' GGUF loader (dequantized by gguf-py),
  - the .gguf file run by llama.cpp (llama-cpp-python, when installed): same token windows, its own kernels,
plus the file size and a greedy generation by llama.cpp. Results: bench/results/<date>-gguf-smollm2.{json,md}.
A mix written `auto=<mix>+<mix>...@<bits>` is AutoScheme over those GGUF options at that target (block layers'
bits per weight, file bytes counted); its file type, embedding and output types are the first option's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from auto_round import AutoRound, AutoScheme
from auto_round.eval import perplexity
from auto_round.eval.llama_cpp import llama_cpp_generate, llama_cpp_perplexity, load_llama
from auto_round.eval.perplexity import EvalError, token_windows
from auto_round.model.assets import smollm2_path
from auto_round.model.offline_text import calibration_texts, heldout_texts

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ["q4_k_m:rtn", "q4_k_m:opt-rtn", "q4_k_m:tuned", "q2_k_s:rtn", "q2_k_s:opt-rtn", "q2_k_s:tuned",
                "q4_0:opt-rtn", "q8_0:opt-rtn"]
PROMPT = "The capital of France is"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="mix:mode with mode rtn | opt-rtn | tuned")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval_samples", type=int, default=8)
    p.add_argument("--eval_seqlen", type=int, default=512)
    p.add_argument("--name", default="gguf-smollm2")
    p.add_argument("--auto_scheme_score", default="delta_loss", choices=["delta_loss", "fisher"],
                   help="the sensitivity of the auto=... runs (AutoScheme.score)")
    p.add_argument("--llama_cpp_no_repack", action="store_true",
                   help="llama.cpp keeps the file's weight layout (its repacked q4_0 / q4_1 kernels give wrong "
                        "results on some CPUs: eval/llama_cpp.load_llama)")
    return p.parse_args()


def llama_cpp_ppl(path: Path, windows: torch.Tensor, repack: bool) -> tuple[float | None, str | None]:
    """llama.cpp's perplexity over the same windows, and its greedy continuation; (None, None) if not installed."""
    try:
        llm = load_llama(path, n_ctx=windows.shape[1], repack=repack)
    except EvalError:
        return None, None
    return llama_cpp_perplexity(llm, windows), llama_cpp_generate(llm, PROMPT)


def llama_cpp_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        return "not installed"
    return llama_cpp.__version__


def scheme_and_format(mix: str, score: str = "delta_loss"):
    """'q4_k_m' -> ('gguf:q4_k_m', 'gguf:q4_k_m'); 'auto=q4_0+q8_0@5.5' -> (AutoScheme(5.5, ...), 'gguf:q4_0')."""
    if not mix.startswith("auto="):
        return f"gguf:{mix}", f"gguf:{mix}"
    options, _, bits = mix[len("auto="):].partition("@")
    mixes = options.split("+")
    return AutoScheme(float(bits), [f"gguf:{m}" for m in mixes], score=score), f"gguf:{mixes[0]}"


def run_one(mix: str, mode: str, args, model_dir: Path, tok, windows, work: Path) -> dict:
    kw = dict(iters=0, disable_opt_rtn=True) if mode == "rtn" else dict(iters=0) if mode == "opt-rtn" else \
        dict(iters=args.iters, lr=args.lr)
    scheme, fmt = scheme_and_format(mix, args.auto_scheme_score)
    ar = AutoRound(str(model_dir), scheme=scheme, dataset=calibration_texts()[: args.nsamples],
                   nsamples=args.nsamples, seqlen=args.seqlen, batch_size=8, low_cpu_mem_usage=False, **kw)
    t0 = time.perf_counter()
    ar.quantize()
    quant_s = time.perf_counter() - t0
    achieved = ar.auto_scheme_plans[0].achieved_avg_bits if ar.auto_scheme_plans else None
    fake_ppl = perplexity(ar.model, tok, heldout_texts(), seqlen=args.eval_seqlen, nsamples=args.eval_samples)
    out = work / f"{mix.replace('+', '-').replace('@', '-')}-{mode}"
    ar.save_quantized(out, format=fmt)
    path = next(out.glob("*.gguf"))
    del ar
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
    hf_ppl = perplexity(loaded, tok, heldout_texts(), seqlen=args.eval_seqlen, nsamples=args.eval_samples)
    del loaded
    cpp_ppl, text = llama_cpp_ppl(path, windows, repack=not args.llama_cpp_no_repack)
    row = {"mix": mix if achieved is None else f"{mix} (achieved {achieved:.3f})", "mode": mode, "iters": kw["iters"],
           "quant_s": round(quant_s, 1), "file": path.name,
           "file_mib": round(path.stat().st_size / 2**20, 1), "ppl_fake": fake_ppl, "ppl_transformers_gguf": hf_ppl,
           "ppl_llama_cpp": cpp_ppl, "llama_cpp_text": text}
    print(json.dumps(row), flush=True)
    return row


def markdown(report: dict) -> str:
    lines = [f"GGUF export of SmolLM2-135M-Instruct, {report['machine']}, llama-cpp-python {report['llama_cpp']}; held-out ppl over "
             f"{report['eval_samples']} x {report['eval_seqlen']} tokens (fp32 model: {report['fp_ppl']:.3f})", "",
             "| mix | mode | quant s | file MiB | ppl fake-quant | ppl transformers(gguf) | ppl llama.cpp | llama.cpp greedy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        cpp = f"{r['ppl_llama_cpp']:.3f}" if r["ppl_llama_cpp"] else "not installed"
        text = (r["llama_cpp_text"] or "").replace("\n", " ").replace("|", "/")
        lines.append(f"| {r['mix']} | {r['mode']}{' ' + str(r['iters']) if r['iters'] else ''} | {r['quant_s']} | "
                     f"{r['file_mib']} | {r['ppl_fake']:.3f} | {r['ppl_transformers_gguf']:.3f} | {cpp} | {text} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    model_dir = smollm2_path()
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = token_windows(tok, heldout_texts(), seqlen=args.eval_seqlen, nsamples=args.eval_samples)
    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fp_ppl = perplexity(fp, tok, heldout_texts(), seqlen=args.eval_seqlen, nsamples=args.eval_samples)
    del fp
    runs = []
    with tempfile.TemporaryDirectory(prefix="ar-gguf-") as work:
        for item in args.runs:
            mix, _, mode = item.partition(":")
            runs.append(run_one(mix, mode or "opt-rtn", args, model_dir, tok, windows, Path(work)))
    report = {"date": datetime.date.today().isoformat(), "fp_ppl": fp_ppl, "eval_samples": args.eval_samples,
              "eval_seqlen": args.eval_seqlen, "nsamples": args.nsamples, "seqlen": args.seqlen, "lr": args.lr,
              "auto_scheme_score": args.auto_scheme_score,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "llama_cpp": llama_cpp_version() + (", no repack" if args.llama_cpp_no_repack else ""),
              "runs": runs}
    stem = ROOT / "bench" / "results" / f"{report['date']}-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
