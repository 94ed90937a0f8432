"""Paired held-out perplexity of two checkpoints: is the difference larger than the text sampling noise?

    .venv/bin/python bench/paired_ppl.py A_DIR B_DIR [C_DIR ...] --tokenizer DIR [--nsamples 360] [--seqlen 512] [--name NAME]
        [--text FILE]

Every model scores the SAME windows (auto_round.eval.token_windows over the held-out articles; 360 windows of 512
tokens cover all of them). Per window w: mean NLL a_w, b_w. The log-perplexity difference is the mean of
d_w = b_w - a_w (ppl_B / ppl_A = exp(mean d) exactly, every window having the same token count), and its
standard error is sd(d) / sqrt(n): a difference within ~2 SE is not distinguishable from the luck of which text
was held out. Each of B, C, ... is compared with A. --text scores another corpus instead (a plain-text file, one
document per line, e.g. gensim's Lee news corpus `test_data/lee_background.cor`, which no calibration set uses). Writes bench/results/<date>-<name>.md when --name is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from auto_round.eval.perplexity import token_windows
from auto_round.model.offline_text import heldout_texts

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def window_nll(path: str, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Mean next-token NLL of each window [n] (fp32), for the checkpoint at `path` loaded in fp32."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out.append(nll.mean(dim=1))
    return torch.cat(out)


def document_lines(path: str) -> list[str]:
    """The non-empty lines of a plain-text corpus file, one document each."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Paired statistics of B against A from their per-window NLLs [n]."""
    d = (b - a).double()
    mean, se = d.mean().item(), d.std().item() / math.sqrt(d.numel())
    return {"ppl_a": math.exp(a.double().mean().item()), "ppl_b": math.exp(b.double().mean().item()),
            "log_ratio_b_over_a": mean, "se": se, "z": mean / se if se else float("inf"),
            "b_better_windows": int((d < 0).sum()), "windows": d.numel()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("a")
    p.add_argument("others", nargs="+", metavar="b")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--nsamples", type=int, default=360)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--name", default=None)
    p.add_argument("--text", default=None, help="plain-text corpus, one document per line (default: held-out articles)")
    args = p.parse_args()
    texts = heldout_texts() if args.text is None else document_lines(args.text)
    corpus = "the held-out articles" if args.text is None else f"`{Path(args.text).name}`"
    windows = token_windows(AutoTokenizer.from_pretrained(args.tokenizer), texts, seqlen=args.seqlen,
                            nsamples=args.nsamples)
    t0 = time.perf_counter()
    a = window_nll(args.a, windows)
    results = []
    for other in args.others:
        result = {"b": other, **compare(a, window_nll(other, windows))}
        print(json.dumps(result), flush=True)
        results.append(result)
    print(json.dumps({"seconds": time.perf_counter() - t0}))
    if args.name:
        date = datetime.date.today().isoformat()
        lines = [f"## Paired held-out perplexity — {date}", "", f"A = `{args.a}`", "",
                 f"{windows.shape[0]} windows of {args.seqlen} tokens ({corpus}), the same for every model. "
                 "ln(ppl B / ppl A) is the mean per-window NLL difference; |z| = |mean| / standard error above ~2 is "
                 "more than the luck of which text was held out.", "",
                 "| B | ppl A | ppl B | ln(ppl B / ppl A) | standard error | z | windows where B is better |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| `{r['b']}` | {r['ppl_a']:.4f} | {r['ppl_b']:.4f} | {r['log_ratio_b_over_a']:+.5f} | {r['se']:.5f} | "
                  f"{r['z']:+.2f} | {r['b_better_windows']} / {r['windows']} |" for r in results]
        (ROOT / "bench" / "results" / f"{date}-{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
