"""AutoScheme on SmolLM2: ours vs uniform W3A16G64 vs the reference's AutoScheme, same data and iters.

    ../shared/peer/setup.sh .venv-peer               # once, for the reference
    .venv/bin/python bench/autoscheme_smollm2.py                       # RTN / opt-RTN (iters 0)
    .venv/bin/python bench/autoscheme_smollm2.py --iters 200 --name autoscheme-sr200   # SignRound
    .venv/bin/python bench/autoscheme_smollm2.py --model tiny --impls ours             # quick check

Runs (each a CLI under `/usr/bin/time -v`, harness.py):
    ours-uniform-w3   --scheme W3A16G64
    ours-auto-3.0     --schemes W2A16G64,W4A16G64 --bits 3.0 (scoring: --auto_scheme_nsamples/seqlen)
    reference-auto-3.0  the same flags on the reference CLI (its scoring defaults: 16 samples x 256 tokens)
    reference-uniform-w3
Recorded: wall time, peak RSS, achieved average bits (ours: autoscheme_plan.json; both: recomputed from the
checkpoint's per-layer bits with our cost model), held-out perplexity (bench/eval_export.py, the shared
loader and text). Scoring time: ours logs it per option ("option k/K scored in S s"); for both, the wall
time minus the same implementation's uniform-W3 run is the cost of the AutoScheme step (same RTN/SignRound
and export otherwise). Peak RSS is of the whole run (scoring + quantization + export).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from compare import RESULTS, evaluate, model_folder, write_calibration
from harness import OURS_BIN, PEER_BIN, run_quantization

SCORED = re.compile(r"AutoScheme: (?:option \d+/\d+|\d+ options) scored (?:\(Fisher\) )?in ([0-9.]+) s")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2', 'tiny', or a model folder")
    p.add_argument("--impls", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    p.add_argument("--options", default="W2A16G64,W4A16G64")
    p.add_argument("--target", default="3.0")
    p.add_argument("--uniform", default="W3A16G64", help="the uniform scheme at about the same bits")
    p.add_argument("--iters", type=int, default=0, help="0: RTN / opt-RTN (both sides' default); >0 SignRound")
    p.add_argument("--nsamples", type=int, default=128, help="calibration samples of the quantization")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--scoring_nsamples", type=int, default=16, help="ours; the reference's default is 16")
    p.add_argument("--scoring_seqlen", type=int, default=256, help="ours; the reference's default is 256")
    p.add_argument("--eval_samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--no_share_fused_layers", action="store_true",
                   help="ours: let q/k/v and gate/up take their own options (the reference never groups them)")
    p.add_argument("--score", default=None, choices=["delta_loss", "fisher"], help="ours: --auto_scheme_score")
    p.add_argument("--auto_only", action="store_true", help="skip the uniform runs (measured before)")
    p.add_argument("--uniform_only", action="store_true", help="only the uniform runs (the baseline of a later --auto_only)")
    return p.parse_args()


def command(impl: str, model: Path, calib: Path, out: Path, args, auto: bool) -> list[str]:
    binary = (OURS_BIN if impl == "ours" else PEER_BIN) / "auto-round"
    cmd = [str(binary), "--model", str(model), "--iters", str(args.iters), "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--batch_size", str(args.batch_size), "--dataset", str(calib),
           "--format", "auto_round", "--output_dir", str(out), "--device_map", "cpu"]
    if not auto:
        return cmd + ["--scheme", args.uniform]
    cmd += ["--schemes", args.options, "--bits", args.target]
    if impl == "ours":
        cmd += ["--auto_scheme_nsamples", str(args.scoring_nsamples), "--auto_scheme_seqlen", str(args.scoring_seqlen)]
        if args.no_share_fused_layers:
            cmd.append("--no_share_fused_layers")
        if args.score:
            cmd += ["--auto_scheme_score", args.score]
    return cmd


def achieved_bits(folder: str) -> float | None:
    """Average bits of the checkpoint's candidate layers, from its quantization_config (our cost model)."""
    import torch  # noqa: F401  (transformers needs it)
    from transformers import AutoConfig, AutoModelForCausalLM

    from auto_round.algorithms.autoscheme import layer_bits
    from auto_round.model.blocks import find_block_groups, quantizable_layers
    from auto_round.schemes import QuantScheme

    config = AutoConfig.from_pretrained(folder)
    qc = config.quantization_config if isinstance(config.quantization_config, dict) else config.quantization_config.to_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    extra = qc.get("extra_config") or {}
    total = numel = 0
    for group in find_block_groups(model):
        for name, module in quantizable_layers(model.get_submodule(group), prefix=group).items():
            fields = {**{k: qc[k] for k in ("bits", "group_size", "sym", "data_type") if k in qc}, **extra.get(name, {})}
            bits = int(fields.get("bits", 16))
            # the data type decides the scale / zero-point bits (MX: 8-bit E8M0 scale, no zero point)
            scheme = QuantScheme(bits=bits, group_size=int(fields.get("group_size", 128)), sym=bool(fields.get("sym", True)),
                                 data_type=fields.get("data_type", "int")) if bits < 16 else QuantScheme(bits=16, data_type="fp")
            out_f, in_f = module.weight.shape
            total += layer_bits(scheme, out_f, in_f)
            numel += out_f * in_f
    return total / numel if numel else None


def main() -> None:
    args = parse_args()
    if "reference" in args.impls and not (PEER_BIN / "auto-round").exists():
        sys.exit("the reference is not installed: run ../shared/peer/setup.sh .venv-peer first")
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ar-autoscheme-"))
    model = model_folder(args.model, work)
    calib = write_calibration(work, args.nsamples)
    fp = evaluate(str(model), model, args)
    runs = []
    for impl in args.impls:
        for auto in (True,) if args.auto_only else (False,) if args.uniform_only else (False, True):
            tag = f"{impl}-{'auto-' + args.target if auto else 'uniform-' + args.uniform}"
            out, log = work / tag, work / f"{tag}.log"
            record = run_quantization(impl, command(impl, model, calib, out, args, auto), out, log, cwd=work,
                                      threads=args.threads)
            row = {"run": tag, "impl": impl, "auto": auto, **asdict(record)}
            text = log.read_text(errors="replace")
            if impl == "ours" and auto:
                row["scoring_s_logged"] = sum(float(s) for s in SCORED.findall(text))
            if record.output_dir:
                row["achieved_avg_bits"] = achieved_bits(record.output_dir)
                plan = Path(record.output_dir) / "autoscheme_plan.json"
                if plan.exists():
                    row["plan_avg_bits"] = json.loads(plan.read_text())["plans"][0]["achieved_avg_bits"]
                try:
                    row.update(evaluate(record.output_dir, model, args))
                except RuntimeError as err:
                    row["ppl"], row["eval_error"] = "load failed", str(err).splitlines()[-1][:300]
            else:
                row["error"] = text[-2000:]
            runs.append(row)
            print(f"{tag}: rc {record.returncode}, wall {record.wall_s:.0f} s, rss {record.peak_rss_mib} MiB, "
                  f"bits {row.get('achieved_avg_bits')}, ppl {row.get('ppl')}", flush=True)
    for impl in args.impls:  # AutoScheme step cost = auto run - uniform run of the same implementation
        by = {r["auto"]: r for r in runs if r["impl"] == impl}
        if len(by) == 2:
            by[True]["autoscheme_extra_wall_s"] = by[True]["wall_s"] - by[False]["wall_s"]
    date = datetime.date.today().isoformat()
    report = {"model": args.model, "date": date, "fp_ppl": fp["ppl"], "options": args.options, "target": args.target,
              "uniform": args.uniform, "iters": args.iters, "runs": runs}
    stem = f"{date}-{args.name or 'autoscheme-' + Path(args.model).name}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
    lines = ["| run | avg bits | ppl | wall s | AutoScheme extra s | scoring s (log) | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['run']} | {r.get('achieved_avg_bits')} | {r.get('ppl')} | {r['wall_s']:.0f} | "
                     f"{r.get('autoscheme_extra_wall_s', '')} | {r.get('scoring_s_logged', '')} | {r['peak_rss_mib']} |")
    md = f"# AutoScheme {args.target} bits from {args.options} vs {args.uniform} ({args.model}, iters {args.iters})\n\n" \
         f"fp ppl {fp['ppl']}\n\n" + "\n".join(lines) + "\n"
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)
    if args.keep:
        print(f"outputs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
