"""What AutoScheme's own scores predict: the best mix of some options vs a uniform scheme, at equal bits.

    .venv/bin/python bench/autoscheme_predict.py --score fisher --threads 2
    .venv/bin/python bench/autoscheme_predict.py --score delta_loss --options W2A16G64,W3A16G64,W4A16G64

Scores every option on every block layer of SmolLM2 (the scoring AutoScheme runs: 16 x 256 calibration
tokens by default), then, for each target and each option subset (--mixes), solves the same knapsack
AutoScheme solves and reports the plan's predicted loss change, i.e. the sum of its layers' scores (the
additive model the plan optimizes), next to each option used uniformly. Both scores are comparable
between plans of one scoring only (the Fisher sum is a second-order estimate of the loss change up to a
constant factor; the delta-loss sum adds absolute first-order terms). A mix that its own scores predict
to lose against a uniform scheme at the same bits will not beat it in practice either: the additive
model ignores that the errors of neighbouring layers compound.
Results: bench/results/<date>-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from auto_round.algorithms.autoscheme import Item, layer_bits, solve
from auto_round.layers import layer_shape
from auto_round.model.assets import smollm2_path
from auto_round.model.autoscheme_fisher import fisher_scores
from auto_round.model.autoscheme_score import delta_loss_scores
from auto_round.model.blocks import iter_blocks, quantizable_layers
from auto_round.model.offline_text import calibration_texts
from auto_round.schemes import get_scheme

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--score", default="fisher", choices=["fisher", "delta_loss"])
    p.add_argument("--options", default="W2A16G64,W3A16G64,W4A16G64", help="every option scored")
    p.add_argument("--mixes", nargs="+", default=["W2A16G64+W4A16G64", "W2A16G64+W3A16G64+W4A16G64"],
                   help="option subsets to plan with ('+'-joined)")
    p.add_argument("--targets", nargs="+", type=float, default=[3.0, 3.296875])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default=None)
    return p.parse_args()


def calibration_ids(tok, nsamples: int, seqlen: int) -> torch.Tensor:
    rows = [tok(t)["input_ids"][:seqlen] for t in calibration_texts()]
    rows = [r for r in rows if len(r) == seqlen][:nsamples]
    return torch.tensor(rows)


def best_plan(scores: dict, costs: dict, options: list[int], budget: int) -> tuple[float, dict[int, int]] | None:
    """(predicted loss = sum of chosen scores, {option: layers}) of the knapsack over `options`, None if infeasible."""
    names = list(scores)
    items = [Item(n, tuple(costs[n][k] for k in options), tuple(scores[n][k] for k in options)) for n in names]
    if sum(min(i.costs) for i in items) > budget:
        return None
    sol = solve(items, budget)
    counts = {options[c]: sol.choice.count(c) for c in range(len(options))}
    return sum(it.losses[c] for it, c in zip(items, sol.choice)), counts


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = calibration_ids(tok, args.nsamples, args.seqlen)
    labels = [o.strip() for o in args.options.split(",")]
    schemes = [get_scheme(o) for o in labels]
    layers = quantizable_layers(model.model.layers, prefix="model.layers")
    option_layers = [{n: (m, s) for n, m in layers.items()} for s in schemes]
    blocks = list(iter_blocks(model, ["model.layers"]))
    scorer = fisher_scores if args.score == "fisher" else delta_loss_scores
    raw = scorer(model, blocks, option_layers, ids, torch.ones_like(ids), batch_size=8)
    scores = {n: [raw[k][n] for k in range(len(labels))] for n in layers}
    costs = {n: [layer_bits(s, *layer_shape(m)) for s in schemes] for n, m in layers.items()}
    numel = sum(layer_shape(m)[0] * layer_shape(m)[1] for m in layers.values())
    rows = []
    for k, label in enumerate(labels):
        rows.append({"plan": f"uniform {label}", "bits": sum(c[k] for c in costs.values()) / numel,
                     "predicted": sum(s[k] for s in scores.values())})
    for target in args.targets:
        for mix in args.mixes:
            options = [labels.index(o) for o in mix.split("+")]
            found = best_plan(scores, costs, options, int(numel * target))
            if found is None:
                continue
            pred, counts = found
            rows.append({"plan": f"{mix} @ {target:g}", "bits": target, "predicted": pred,
                         "layers": {labels[k]: c for k, c in counts.items()}})
    date = datetime.date.today().isoformat()
    stem = ROOT / "bench" / "results" / f"{date}-{args.name or 'smollm2-autoscheme-predict-' + args.score}"
    report = {"date": date, "score": args.score, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "scores": scores, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# AutoScheme {args.score} scores on SmolLM2 ({args.nsamples} x {args.seqlen}): predicted loss of plans",
             "", "| plan | avg bits (scales counted) | predicted (sum of scores) | layers per option |", "|---|---|---|---|"]
    lines += [f"| {r['plan']} | {r['bits']:.4f} | {r['predicted']:.5g} | {r.get('layers', '')} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
