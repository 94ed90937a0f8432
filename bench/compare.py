"""Ours vs the reference (auto-round 0.16.1 in .venv-peer), same model, data and settings, one after the other.

    ../shared/peer/setup.sh .venv-peer               # once
    .venv/bin/python bench/compare.py --model smollm2 --settings w4_rtn w4_sr50 w2g64_sr200
    .venv/bin/python bench/compare.py --model tiny    # a 3.5M-parameter random Llama, for quick runs

For every setting and implementation: the CLI runs under `/usr/bin/time -v` (peak RSS), its log gives
the tuning time and per-block loss, the exported folder is reloaded from disk with transformers in our
venv and scored on held-out Wikipedia (same loader and text for both: the auto_round format is shared),
and its size is summed. Results: `bench/results/<date>-<name>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from harness import (OURS_BIN, PEER_BIN, ROOT, RunRecord, record_from_log, reference_loss_to_mse, run_json,
                     run_quantization)

RESULTS = ROOT / "bench" / "results"
SETTINGS = {  # name: (scheme, iters, lr)
    "w4_rtn": ("W4A16", 0, None),
    "w4_optrtn": ("W4A16", 0, None),
    "w4_sr50": ("W4A16", 50, 5e-3),
    "w4_sr50_amp": ("W4A16", 50, 5e-3),
    # memory only: a block's tuning state does not depend on iters, so 2 iterations give the peak RSS of a
    # SignRound run without its wall time (the ppl of this setting means nothing)
    "w4_sr2": ("W4A16", 2, 5e-3),
    "w2g64_sr200": ("W2A16G64", 200, None),
    "w2g64_sr200_amp": ("W2A16G64", 200, None),
    "w4_sr200": ("W4A16", 200, None),
    "w2g64_sr200_bf16": ("W2A16G64", 200, None),
    "w2g64_sr50": ("W2A16G64", 50, None),
    "w2g64_sr50_bf16": ("W2A16G64", 50, None),
    "w4_sr50_bf16": ("W4A16", 50, 5e-3),
    # "*_algext": the same with --enable_alg_ext on both sides (SignRoundV2: opt-RTN init scales, clip scales
    # in [0, 2], top-0.1 % outlier-masked loss); compare each with its plain setting at the same iters
    "w2g64_sr200_algext": ("W2A16G64", 200, None),
    "w2g64_sr50_algext": ("W2A16G64", 50, None),
    "mxfp4_sr200": ("MXFP4", 200, None),
    "mxfp4_sr200_algext": ("MXFP4", 200, None),
}
for _name, _scheme in (("mxfp4", "MXFP4"), ("nvfp4", "NVFP4"), ("fp8static", "FP8_STATIC"), ("mxfp8", "MXFP8"),
                       ("mxfp6", "MXFP6"), ("w2", "W2A16"), ("w3", "W3A16"), ("w2g64", "W2A16G64")):
    # the data-type grid (issue 6): RTN, opt-RTN (the iters=0 default of both) and SignRound at 50 iterations
    SETTINGS.setdefault(f"{_name}_rtn", (_scheme, 0, None))
    SETTINGS.setdefault(f"{_name}_rtn_bf16", (_scheme, 0, None))  # ours on the bf16 weights the reference rounds
    SETTINGS.setdefault(f"{_name}_optrtn", (_scheme, 0, None))
    SETTINGS.setdefault(f"{_name}_sr50", (_scheme, 50, None))
    SETTINGS.setdefault(f"{_name}_sr50_algext", (_scheme, 50, None))
    SETTINGS.setdefault(f"{_name}_sr50_fp32", (_scheme, 50, None))
SETTINGS["w2g64_sr200_fp32"] = ("W2A16G64", 200, None)
# "<setting>_cap<N>": ours with --massive_token_cap N (default 4; cap0 = the reference's plain loss, which the
# reference always uses)
for _base in ("w2g64_sr200", "w4_sr50", "nvfp4_sr50_fp32", "mxfp4_sr50_fp32", "fp8static_sr50"):
    for _cap in (0, 1, 2, 4, 8):
        SETTINGS[f"{_base}_cap{_cap}"] = SETTINGS[_base]
# "<setting>_compiled": ours with --enable_torch_compile (the reference compiles by default: reference doc 1.13)
for _base in ("mxfp4_sr50_fp32", "nvfp4_sr50_fp32", "mxfp4_sr50", "nvfp4_sr50"):
    SETTINGS[f"{_base}_compiled"] = SETTINGS[_base]
# "<setting>_noreuse": ours with --disable_reuse_freed_memory (glibc's malloc defaults: the timing before 2026-12-07)
for _base in ("w4_sr50", "w4_rtn", "mxfp4_sr50", "nvfp4_sr50", "w2g64_sr200"):
    SETTINGS[f"{_base}_noreuse"] = SETTINGS[_base]
# "<setting>_fp8clip": ours with --enable_fp8_clip_tuning (fp8 weight clips tuned, as the reference always does;
# ours leaves them at 1 since 2026-12-07, MXFP8's too since 2026-12-07 b)
for _base in ("fp8static_sr50", "fp8static_sr50_fp32", "mxfp8_sr50_fp32"):
    SETTINGS[f"{_base}_fp8clip"] = SETTINGS[_base]
# "<setting>_noclip": both sides tune the rounding only (ours --disable_minmax_tuning, the reference
# --no-enable_minmax_tuning): no weight clip, no static activation clip
for _base in ("mxfp6_sr50_fp32", "mxfp4_sr50_fp32", "mxfp8_sr50_fp32"):
    SETTINGS[f"{_base}_noclip"] = SETTINGS[_base]
# "<setting>_adam": both sides with --enable_adam (AdamRound: AdamW steps instead of signed ones)
for _base in ("w4_sr50", "w2g64_sr200"):
    SETTINGS[f"{_base}_adam"] = SETTINGS[_base]
# Ours keeps the model fp32 and autocasts the tuning matmuls to bf16 where bf16 is fast; "*_bf16" settings
# load ours in bf16 instead (--model_dtype bf16), as the reference does with its whole model on CPU; "*_fp32"
# pass --disable_amp to both (on a CPU without bf16 both tune in fp32 anyway). The reference's CLI ignores that
# flag (0.16.1) and tunes a bf16 model on a bf16 CPU: runs of "*_fp32" before 2026-12-07 on the AVX-512-BF16 box
# were ours fp32 against the reference in bf16; bench/peer_cli.py now passes amp=False for it.


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2', 'tiny', or a model folder")
    p.add_argument("--settings", nargs="+", default=["w4_rtn", "w4_sr50", "w2g64_sr200"], choices=list(SETTINGS))
    p.add_argument("--impls", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=42, help="tuning seed passed to both CLIs (both default to 42)")
    p.add_argument("--name", default=None, help="results file name (default: <model>)")
    p.add_argument("--decode_setting", default="w4_rtn", help="whose exports to time for prefill/decode ('' = skip)")
    p.add_argument("--rescore", default=None, metavar="WORKDIR",
                   help="do not quantize: rebuild the report from the logs and exports a --keep run left in WORKDIR")
    p.add_argument("--keep", action="store_true", help="keep the exported folders (printed at the end)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the quantization runs (1 keeps a shared, busy machine from "
                        "oversubscribing; times are then not comparable with other runs)")
    return p.parse_args()


def tiny_llama(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from tiny_models import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=256, eos_token_id=256, pad_token_id=257)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def model_folder(name: str, work: Path) -> Path:
    if name == "smollm2":
        from auto_round.model.assets import smollm2_path

        return smollm2_path()
    if name == "tiny":
        return tiny_llama(work / "tiny-llama")
    path = Path(name).expanduser().resolve()
    if not (path / "config.json").is_file():
        sys.exit(f"--model {name}: not 'smollm2', 'tiny' or a folder with config.json")
    return path


def write_calibration(work: Path, nsamples: int) -> Path:
    """The first `nsamples` bundled calibration articles as a JSON list: both CLIs read it the same way."""
    from auto_round.model.offline_text import calibration_texts

    path = work / "calib.json"
    path.write_text(json.dumps(calibration_texts()[:nsamples]))
    return path


def cli_command(impl: str, model: Path, setting: str, calib: Path, out: Path, args) -> list[str]:
    scheme, iters, lr = SETTINGS[setting]
    setting, _, cap = setting.partition("_cap")
    adam = setting.endswith("_adam")
    setting = setting.removesuffix("_adam")
    noreuse = setting.endswith("_noreuse")
    setting = setting.removesuffix("_noreuse")
    compiled = setting.endswith("_compiled")
    setting = setting.removesuffix("_compiled")
    fp8clip = setting.endswith("_fp8clip")
    setting = setting.removesuffix("_fp8clip")
    noclip = setting.endswith("_noclip")
    setting = setting.removesuffix("_noclip")
    # the reference through bench/peer_cli.py: its own CLI, with --disable_amp honoured (0.16.1 ignores the flag)
    launcher = ([str(OURS_BIN / "auto-round")] if impl == "ours"
                else [str(PEER_BIN / "python"), str(ROOT / "bench" / "peer_cli.py")])
    cmd = [*launcher, "--model", str(model), "--scheme", scheme, "--iters", str(iters),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch_size", str(args.batch_size),
           "--seed", str(args.seed), "--dataset", str(calib), "--format", "auto_round", "--output_dir", str(out), "--device_map", "cpu"]
    if setting.endswith("_algext"):
        cmd.append("--enable_alg_ext")  # both CLIs take the same flag
    if setting.endswith("_amp") and impl == "ours":
        cmd.append("--amp")
    if setting.endswith("_fp32"):  # both sides: no amp (fp32 tuning), whatever the CPU supports
        cmd.append("--disable_amp")
    if setting.endswith("_bf16") and impl == "ours":
        cmd += ["--model_dtype", "bf16"]
    if iters == 0 and setting.endswith(("_rtn", "_rtn_bf16")):
        cmd.append("--disable_opt_rtn")  # plain RTN; "*_optrtn" keeps both sides' iters=0 default (opt-RTN)
    if cap and impl == "ours":
        cmd += ["--massive_token_cap", cap]
    if compiled and impl == "ours":
        cmd.append("--enable_torch_compile")
    if noreuse and impl == "ours":
        cmd.append("--disable_reuse_freed_memory")
    if fp8clip and impl == "ours":
        cmd.append("--enable_fp8_clip_tuning")
    if noclip:
        cmd.append("--disable_minmax_tuning" if impl == "ours" else "--no-enable_minmax_tuning")
    if adam:
        cmd.append("--enable_adam")  # both CLIs take the same flag
    return cmd + (["--lr", str(lr)] if lr is not None else [])


def evaluate(folder: str, tokenizer: Path, args) -> dict:
    line = run_json(OURS_BIN / "python", ROOT / "bench" / "eval_export.py",
                    [folder, "--tokenizer", str(tokenizer), "--nsamples", str(args.eval_samples)], cwd=ROOT)
    return json.loads(line)


def decode_speeds(model: Path, runs: list[dict], setting: str, work: Path) -> list[dict]:
    """Prefill/decode tokens/s: fp32 model and our export (our venv), the reference's export (its venv)."""
    script = ROOT / "bench" / "decode_speed.py"
    cases = [("fp32 model, fp32 (transformers)", OURS_BIN / "python", str(model), ROOT, "float32"),
             ("fp32 model, bf16 (transformers)", OURS_BIN / "python", str(model), ROOT, "bfloat16")]
    for row in runs:
        if row["setting"] == setting and row.get("output_dir"):
            python = OURS_BIN / "python" if row["impl"] == "ours" else PEER_BIN / "python"
            for dtype in ("float32", "bfloat16"):
                cases.append((f"{setting} {row['impl']} export, loaded by {row['impl']}, {dtype}", python,
                              row["output_dir"], ROOT if row["impl"] == "ours" else work, dtype))
    results = []
    for label, python, folder, cwd, dtype in cases:
        try:
            line = run_json(python, script, [folder, "--dtype", dtype], cwd=cwd)
            results.append({"case": label, **json.loads(line)})
        except RuntimeError as err:
            results.append({"case": label, "error": str(err).splitlines()[-1][:300]})
        print(results[-1], flush=True)
    return results


def markdown(report: dict) -> str:
    lines = [f"## {report['model']} — {report['date']}", "",
             f"machine: {report['machine']}; fp32 held-out ppl {report['fp_ppl']:.3f}; "
             f"calibration {report['nsamples']} x {report['seqlen']} tokens, batch {report['batch_size']}", "",
             "| setting | impl | tuning s | total s | peak RSS MiB | ppl (reloaded) | size MiB | mean block loss first -> best |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["runs"]:
        losses = row["block_losses"]
        loss = (f"{sum(b['loss_first'] for b in losses) / len(losses):.4g} -> "
                f"{sum(b['loss_best'] for b in losses) / len(losses):.4g}") if losses else ""
        fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else str(v)  # noqa: E731
        lines.append(f"| {row['setting']} | {row['impl']} | {fmt(row['tuning_s'], '.1f')} | {row['wall_s']:.1f} | "
                     f"{fmt(row['peak_rss_mib'], '.0f')} | {fmt(row.get('ppl'), '.3f')} | "
                     f"{fmt(row['output_mib'], '.1f')} | {loss} |")
    if report.get("decode"):
        lines += ["", "| inference (CPU, 256-token prompt, 64 greedy tokens) | prefill tok/s | decode tok/s |",
                  "|---|---|---|"]
        for d in report["decode"]:
            if "error" in d:
                lines.append(f"| {d['case']} | failed: {d['error']} | |")
            else:
                lines.append(f"| {d['case']} | {d['prefill_tok_s']:.0f} | {d['decode_tok_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if "reference" in args.impls and not (PEER_BIN / "auto-round").exists():
        sys.exit("the reference is not installed: run ../shared/peer/setup.sh .venv-peer first")
    RESULTS.mkdir(exist_ok=True)
    work = Path(args.rescore) if args.rescore else Path(tempfile.mkdtemp(prefix="ar-bench-"))  # outside the repo
    model = model_folder(args.model, work)
    calib = write_calibration(work, args.nsamples)
    args.keep = args.keep or bool(args.rescore)
    fp = evaluate(str(model), model, args)
    runs = []
    for setting in args.settings:
        for impl in args.impls:
            out = work / f"{impl}-{setting}"
            log = work / f"{impl}-{setting}.log"
            if args.rescore:
                if not log.exists():
                    continue
                record: RunRecord = record_from_log(impl, log, out)
            else:
                record = run_quantization(impl, cli_command(impl, model, setting, calib, out, args), out, log, cwd=work,
                                          threads=args.threads)
            if impl == "reference":  # same units as ours (plain masked MSE)
                record = replace(record, block_losses=reference_loss_to_mse(record.block_losses, args.batch_size,
                                                                            args.seqlen))
            row = {"setting": setting, **asdict(record)}
            if record.output_dir:
                try:
                    row.update(evaluate(record.output_dir, model, args))
                except RuntimeError as err:  # an export transformers cannot load: record it, go on
                    row["ppl"] = "load failed"
                    row["eval_error"] = str(err).splitlines()[-1][:300]
            else:
                row["error"] = Path(record.log_file).read_text(errors="replace")[-2000:]
            runs.append(row)
            print(f"{setting} {impl}: rc {record.returncode}, tuning {record.tuning_s}, wall {record.wall_s:.0f} s, "
                  f"rss {record.peak_rss_mib} MiB, ppl {row.get('ppl')}", flush=True)
    decode = decode_speeds(model, runs, args.decode_setting, work) if args.decode_setting else []
    date = datetime.date.today().isoformat()
    import torch

    report = {"model": args.model, "date": date, "fp_ppl": fp["ppl"], "nsamples": args.nsamples, "seed": args.seed,
              "seqlen": args.seqlen, "batch_size": args.batch_size, "decode": decode,
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}", "runs": runs}
    stem = f"{date}-{args.name or Path(args.model).name}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    if args.keep:
        print(f"outputs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
