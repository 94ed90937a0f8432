"""SignRound block by block, ours against the reference, on identical inputs: the controlled comparison the
end-to-end bench cannot give (there the two read the same JSON but differ in everything around the tuning).

    .venv/bin/python bench/tuning_vs_reference.py --layers 12 --scheme W2A16G64 --iters 200 [--lr 5e-3] [--amp]

1. SmolLM2-135M-Instruct cut to its first `--layers` decoder layers is saved with 32 x 256 calibration token
   ids (the first bundled articles of >= 256 tokens, cut at 256: what both CLIs take from the bench JSON)
   and 8 x 256 held-out ids.
2. `block_trace.py` runs in each venv at the same time, one thread each: same ids, same seed, same batch
   size, fp32 on both sides unless --amp (then each its own default: ours bf16 autocast where bf16 is fast,
   the reference a bf16 model).
3. Per block: held-out hidden-state MSE against the fp model, first / best / last batch loss; written to
   bench/results/<date>-tuning-vs-reference-<name>.{json,md}.

With fp32 both sides see the same first batch, so block 0's iteration-0 loss must agree to the last digit;
later blocks start from different quantized inputs and drift apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from harness import OURS_BIN, PEER_BIN, ROOT

RESULTS = ROOT / "bench" / "results"


def prepare(folder: Path, layers: int, nsamples: int, seqlen: int) -> None:
    """The truncated model, its tokenizer, calib_ids.pt [nsamples, seqlen] and heldout_ids.pt [8, seqlen]."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from auto_round.model.assets import smollm2_path
    from auto_round.model.offline_text import calibration_texts, heldout_texts

    src = smollm2_path()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(folder)
    tok.save_pretrained(folder)

    def windows(texts, n):
        ids = [x[:seqlen] for x in (tok(t)["input_ids"] for t in texts) if len(x) >= seqlen][:n]
        if len(ids) < n:
            sys.exit(f"only {len(ids)} texts of >= {seqlen} tokens, need {n}")
        return torch.tensor(ids)

    torch.save(windows(calibration_texts(), nsamples), folder / "calib_ids.pt")
    torch.save(windows(heldout_texts(), 8), folder / "heldout_ids.pt")


def block_rows(ours: dict, ref: dict, iters: int, quant_from: int = 0) -> list[dict]:
    """One row per decoder layer; losses exist only for the tuned layers (quant_from and later)."""
    rows = []
    for b, (mo, mr) in enumerate(zip(ours["hidden_mse"], ref["hidden_mse"])):
        t = b - quant_from
        lo, lr = ([], []) if t < 0 else (ours["losses"][t * iters:(t + 1) * iters], ref["losses"][t * iters:(t + 1) * iters])
        row = {"block": b, "heldout_mse_ours": mo, "heldout_mse_ref": mr}
        for tag, ls in (("ours", lo), ("ref", lr)):
            if ls:
                row.update({f"first_{tag}": ls[0], f"best_{tag}": min(ls), f"best_iter_{tag}": ls.index(min(ls)),
                            f"last_{tag}": ls[-1]})
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"## tuning vs reference — {report['date']}", "",
             f"SmolLM2 first {a['layers']} layers, {a['scheme']}, {a['iters']} iters, lr {a['lr'] or '1/iters'}, "
             f"{a['nsamples']} x {a['seqlen']} identical ids, batch 8, seed 42, "
             f"{'each its default amp' if a['amp'] else 'fp32 both'}, one thread each (both at once). "
             f"quantize() s: ours {report['seconds_ours']:.0f}, reference {report['seconds_ref']:.0f}.", "",
             "| block | held-out MSE ours | reference | first loss ours / ref | best ours / ref |",
             "|---|---|---|---|---|"]
    for r in report["blocks"]:
        lines.append(f"| {r['block']} | {r['heldout_mse_ours']:.4f} | {r['heldout_mse_ref']:.4f} | "
                     f"{r.get('first_ours', float('nan')):.4g} / {r.get('first_ref', float('nan')):.4g} | "
                     f"{r.get('best_ours', float('nan')):.4g} / {r.get('best_ref', float('nan')):.4g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--scheme", default="W2A16G64")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--work", default="/tmp/ar-tuning-vs-reference")
    p.add_argument("--name", default=None)
    p.add_argument("--quant_from", type=int, default=0, help="layers below this index stay fp (block_trace.py)")
    args = p.parse_args()
    if not (PEER_BIN / "python").exists():
        sys.exit("the reference venv is missing: run ../shared/peer/setup.sh (make peer)")
    work = Path(args.work)
    folder = work / f"smollm2-{args.layers}l-{args.nsamples}x{args.seqlen}"
    if not (folder / "heldout_ids.pt").exists():
        folder.mkdir(parents=True, exist_ok=True)
        prepare(folder, args.layers, args.nsamples, args.seqlen)
    procs, outs = [], {}
    for impl, binary in (("ours", OURS_BIN), ("reference", PEER_BIN)):
        outs[impl] = work / f"{impl}-{args.scheme}-{args.iters}{'-amp' if args.amp else ''}-from{args.quant_from}.json"
        cmd = [str(binary / "python"), str(ROOT / "bench" / "block_trace.py"), "--impl", impl, "--model", str(folder),
               "--scheme", args.scheme, "--iters", str(args.iters), "--out", str(outs[impl])]
        cmd += (["--lr", str(args.lr)] if args.lr else []) + (["--amp"] if args.amp else [])
        cmd += ["--quant_from", str(args.quant_from)] if args.quant_from else []
        log = open(work / f"{impl}.log", "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    if any(pr.wait() != 0 for pr in procs):
        sys.exit(f"a run failed: see the logs in {work}")
    ours, ref = (json.loads(outs[i].read_text()) for i in ("ours", "reference"))
    date = datetime.date.today().isoformat()
    report = {"date": date, "args": vars(args), "seconds_ours": ours["seconds"], "seconds_ref": ref["seconds"],
              "blocks": block_rows(ours, ref, args.iters, args.quant_from), "losses_ours": ours["losses"], "losses_ref": ref["losses"]}
    name = args.name or (f"{args.layers}l-{args.scheme.lower()}-{args.iters}{'-amp' if args.amp else ''}"
                         f"{f'-from{args.quant_from}' if args.quant_from else ''}")
    stem = RESULTS / f"{date}-tuning-vs-reference-{name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
