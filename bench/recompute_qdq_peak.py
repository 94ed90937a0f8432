"""Peak memory and time of SignRound with and without recompute_qdq, on one wide random decoder block.

    .venv/bin/python bench/recompute_qdq_peak.py [--hidden 2048 --intermediate 8192] [--schemes MXFP4 NVFP4]

A one-layer random Llama (hidden x intermediate, 16 heads, 4 KV heads; 2048 x 8192 is a 1B-class block with 67 M
quantized weights) is tuned for a few iterations in a fresh process per setting; each prints the peak RSS added
by quantize() (VmHWM after resetting it, minus the RSS before) and quantize()'s wall time. Results:
bench/results/<date>-recompute-qdq.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = r'''
import json, sys, time, psutil, torch, transformers as tf
from auto_round import AutoRound
hidden, inter, scheme, recompute, iters = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=260, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                     num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256)
model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
ids = torch.randint(0, 260, (8, 256), generator=torch.Generator().manual_seed(0))
ar = AutoRound(model, scheme=scheme, dataset=ids, iters=iters, nsamples=8, seqlen=256, batch_size=4, amp=False,
               device="cpu", recompute_qdq=recompute, disable_progress=True)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
ar.quantize()
seconds = time.perf_counter() - t0
hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
weights = sum(m.weight.numel() for n, m in model.named_modules() if n.startswith("model.layers.") and hasattr(m, "weight") and m.weight.dim() == 2)
print(json.dumps({"peak_added_mib": (hwm - base) / 2**20, "quantize_s": seconds, "block_weights": weights}))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--schemes", nargs="+", default=["MXFP4", "NVFP4"])
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per setting (the smaller peak is kept)")
    args = p.parse_args()
    rows = []
    for scheme in args.schemes:
        for _ in range(args.repeats):
            for recompute in (False, True):
                out = subprocess.run([sys.executable, "-c", WORKER, str(args.hidden), str(args.intermediate), scheme,
                                      "1" if recompute else "0", str(args.iters)], capture_output=True, text=True,
                                     cwd=ROOT, timeout=1800)
                if out.returncode:
                    raise RuntimeError(out.stderr[-3000:])
                res = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"scheme": scheme, "recompute_qdq": recompute, **res})
                print(rows[-1], flush=True)
    date = datetime.date.today().isoformat()
    stem = ROOT / "bench" / "results" / f"{date}-recompute-qdq"
    stem.with_suffix(".json").write_text(json.dumps({"hidden": args.hidden, "intermediate": args.intermediate,
                                                     "iters": args.iters, "rows": rows}, indent=1))
    lines = [f"## recompute_qdq: one random Llama block {args.hidden} x {args.intermediate}, 8 x 256 tokens, batch 4, "
             f"{args.iters} iters, fp32 — {date}", "",
             "| scheme | recompute_qdq | peak added by quantize() MiB | quantize() s |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['recompute_qdq']} | {r['peak_added_mib']:.0f} | {r['quantize_s']:.1f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
