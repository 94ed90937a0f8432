"""Memory and time of quantizing and packing ONE big layer (a 7B model's MLP shape by default).

    .venv/bin/python bench/big_layer_memory.py --name big-layer-memory
    PYTHONPATH=/path/to/other/checkout .venv/bin/python bench/big_layer_memory.py --name big-layer-memory-before

Each case runs in a fresh process (the peak RSS of a process only grows), on a random fp32 nn.Linear of
--out x --in, and reports how much the process grew (ru_maxrss after minus before the call) and the call's time:
  search:<scheme>   the opt-RTN scale search alone (algorithms/init_scales.py)
  rtn:<scheme>      plain RTN of the layer (algorithms/signround.rtn_block), result codes included
  optrtn:<scheme>   opt-RTN of the layer (algorithms/opt_rtn.opt_rtn_block)
  pack:<bits>       GPTQ qweight packing of random codes (packing/gptq.pack_qweight)
Writes bench/results/<date>-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ["search:W4A16", "search:MXFP4", "search:NVFP4", "rtn:W4A16", "rtn:MXFP4", "rtn:NVFP4", "rtn:MXFP8",
         "rtn:FP8_STATIC", "rtn:FP8_BLOCK",
         "optrtn:W4A16", "optrtn:MXFP4", "pack:4", "pack:2"]

CHILD = r"""
import json, resource, sys, time, torch
from torch import nn
import auto_round
from auto_round.algorithms.init_scales import float_init_scale, int_clip_factor
from auto_round.algorithms.opt_rtn import opt_rtn_block
from auto_round.algorithms.signround import rtn_block
from auto_round.packing.gptq import pack_qweight
from auto_round.schemes import get_scheme
kind, arg, out_f, in_f = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
torch.set_num_threads(2)
lin = nn.Linear(in_f, out_f, bias=False)
imatrix = torch.rand(in_f)
codes = torch.randint(0, 2 ** int(arg), (out_f, in_f), dtype=torch.uint8) if kind == "pack" else None
scheme = None if kind == "pack" else get_scheme(arg)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base, start = rss(), time.perf_counter()
if kind == "pack":
    pack_qweight(codes, int(arg))
elif kind == "search":
    (int_clip_factor if scheme.data_type == "int" else float_init_scale)(lin, scheme, imatrix)
elif kind == "rtn":
    rtn_block({"l": (lin, scheme)}, act_max={"l": torch.tensor(3.0)})
else:
    opt_rtn_block({"l": (lin, scheme)}, {"l": imatrix}, act_max={"l": torch.tensor(3.0)})
print(json.dumps({"seconds": time.perf_counter() - start, "growth_mib": rss() - base,
                  "code": auto_round.__file__.rsplit("/", 2)[0]}))
"""


def run_case(case: str, out_f: int, in_f: int) -> dict:
    kind, arg = case.split(":")
    # not run from a checkout: the child's sys.path[0] ('' = its cwd) must not shadow PYTHONPATH's auto_round
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, arg, str(out_f), str(in_f)], capture_output=True,
                          text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr.strip().splitlines()[-1]}
    return {"case": case, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_features", type=int, default=11008)
    p.add_argument("--in_features", type=int, default=4096)
    p.add_argument("--cases", nargs="+", default=CASES)
    p.add_argument("--name", default="big-layer-memory")
    args = p.parse_args()
    import torch

    rows = [run_case(c, args.out_features, args.in_features) for c in args.cases]
    layer_mib = args.out_features * args.in_features * 4 / 2**20
    stamp = time.strftime("%Y-%m-%d")
    out = ROOT / "bench" / "results" / f"{stamp}-{args.name}"
    meta = {"machine": f"{platform.machine()}, 2 threads, torch {torch.__version__}",
            "auto_round": sorted({r.get("code", "?") for r in rows}), "layer": [args.out_features, args.in_features],
            "layer_fp32_mib": layer_mib}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"## One {args.out_features} x {args.in_features} layer ({layer_mib:.0f} MiB fp32) — {stamp}", "",
             f"{meta['machine']}; code from {meta['auto_round']}", "",
             "| case | s | process growth MiB |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r.get('seconds', float('nan')):.2f} | "
                     f"{r.get('growth_mib', float('nan')):.0f} |" if "error" not in r else
                     f"| {r['case']} | error: {r['error'][:80]} | |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
