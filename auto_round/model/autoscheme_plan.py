"""AutoScheme plan: budget, items, scores and the knapsack -> one scheme per layer (per target).

Budget (reference, `P = int(sum numel * avg_bits)`): over every candidate layer (the block layers, plus
lm_head with quant_lm_head when it is not tied). The bits of the layers the user fixed (layer_config,
fp_layers) are subtracted first; the rest goes to the allocated items. Embeddings are never quantized here,
so they are neither counted nor allocated (the reference counts them and picks their scheme by a
heuristic; we do not quantize embeddings outside GGUF). Achieved average bits = total bits / total numel
of the candidate layers, fixed ones included, and is <= the target by construction (exact integers).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..algorithms.autoscheme import AutoScheme, AutoSchemeError, Item, build_groups, layer_bits, solve
from ..layers import layer_shape
from ..schemes import QuantScheme, gguf_scheme
from .gguf_mix import fallback
from .layer_config import apply_shape_rule


@dataclass
class AutoSchemePlan:
    """One target's result. layer_schemes: every candidate layer (fixed ones included)."""

    target: float
    budget_bits: int
    total_bits: int
    total_numel: int
    fixed_bits: int
    labels: tuple[str, ...]
    layer_schemes: dict[str, QuantScheme]
    choice: dict[str, int]  # allocated layer -> option index
    groups: list[list[str]]
    scores: dict[str, list[float]] = field(default_factory=dict)  # allocated layer -> score per option
    share_fused_layers: bool = True  # False: q/k/v, gate/up were allowed different options (not vLLM-loadable)
    score: str = "fisher"  # the sensitivity the scores are (AutoScheme.score)

    @property
    def achieved_avg_bits(self) -> float:
        return self.total_bits / self.total_numel

    def layer_config(self) -> dict[str, dict[str, Any]]:
        """{layer: scheme fields} of the allocated layers: an AutoRound layer_config."""
        return {n: self.layer_schemes[n].to_dict() for n in self.choice}

    def to_json(self) -> dict[str, Any]:
        return {
            "target_avg_bits": self.target, "achieved_avg_bits": self.achieved_avg_bits,
            "budget_bits": self.budget_bits, "total_bits": self.total_bits, "total_numel": self.total_numel,
            "fixed_bits": self.fixed_bits, "options": list(self.labels),
            "layers": {n: self._layer_json(n, k) for n, k in self.choice.items()},
            "groups": [g for g in self.groups if len(g) > 1], "share_fused_layers": self.share_fused_layers,
            "score": self.score,
            "layer_config": self.layer_config(),
        }

    def _layer_json(self, name: str, option: int) -> dict[str, Any]:
        scheme = self.layer_schemes[name]
        entry = {"option": self.labels[option], "bits": scheme.bits, "scores": self.scores.get(name)}
        if scheme.gguf is not None:  # after llama.cpp's row fallback (q2_k on rows of 576 is q4_0)
            entry["ggml_type"] = scheme.gguf
        return entry

    def table(self) -> str:
        """Layer x option scores, '*' on the chosen option (GGUF: then the ggml type it stores after the row
        fallback), then the achieved bits."""
        width = max([len(n) for n in self.choice] + [5])
        ggml = any(s.gguf is not None for s in self.layer_schemes.values())
        cols = [f"{lab:>14}" for lab in self.labels] + ([f"{'ggml type':>10}"] if ggml else [])
        lines = [f"{'layer':<{width}} " + " ".join(cols)]
        for n, k in self.choice.items():
            cells = []
            for j, s in enumerate(self.scores.get(n) or [float("nan")] * len(self.labels)):
                cells.append(f"{('*' if j == k else '') + format(s, '.4g'):>14}")
            if ggml:
                cells.append(f"{self.layer_schemes[n].gguf or '-':>10}")
            lines.append(f"{n:<{width}} " + " ".join(cells))
        lines.append(f"AutoScheme target {self.target:g} bits: achieved {self.achieved_avg_bits:.4f} "
                     f"({self.total_bits} of {self.budget_bits} budget bits over {self.total_numel} weights)")
        return "\n".join(lines)


def most_common_scheme(schemes: dict[str, QuantScheme]) -> QuantScheme:
    """The quantized scheme most layers have (the checkpoint's global scheme: the fewest extra_config entries)."""
    counts = Counter(s for s in schemes.values() if s.is_quantized)
    return counts.most_common(1)[0][0] if counts else next(iter(schemes.values()))


def option_for_layer(name: str, module: nn.Module, scheme: QuantScheme) -> QuantScheme:
    """What an option becomes on one layer: a ggml type after llama.cpp's row-length fallback (q2_k on rows
    of 576 -> q4_0), any other scheme after the shape rule (fp where it cannot be packed)."""
    if scheme.gguf is not None:
        return gguf_scheme(fallback(scheme.gguf, layer_shape(module)[1]))
    return apply_shape_rule(name, module, scheme)


def _costs(model: nn.Module, names: Sequence[str], schemes: Sequence[QuantScheme], ignore: bool):
    """(per layer, per option scheme after the shape rule; per layer, per option bits; numel per layer)."""
    per_layer, costs, numel = {}, {}, {}
    for n in names:
        module = model.get_submodule(n)
        out_f, in_f = layer_shape(module)
        per_layer[n] = [option_for_layer(n, module, s) for s in schemes]
        costs[n] = [layer_bits(s, out_f, in_f, ignore) for s in per_layer[n]]
        numel[n] = out_f * in_f
    return per_layer, costs, numel


def _some(names: Sequence[str], shown: int = 3) -> str:
    """'a, b, c and 2 more' for a message."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def allocate(auto: AutoScheme, model: nn.Module, block_groups: Sequence[str], base: dict[str, QuantScheme],
             fixed: set[str], score_fn) -> list[AutoSchemePlan]:
    """One plan per target of `auto`. base: every candidate layer's scheme before allocation (fixed layers
    keep theirs); score_fn(option_layers) -> per option {layer: score} (model/autoscheme_fisher.py or
    model/autoscheme_score.py)."""
    names = [n for n in base if n not in fixed]
    if not names:
        raise AutoSchemeError("every candidate layer is fixed by layer_config / fp_layers: nothing to allocate")
    ignore = auto.ignore_scale_zp_bits
    per_layer, costs, numel = _costs(model, names, auto.schemes, ignore)
    fixed_bits = 0
    for n in fixed:
        out_f, in_f = layer_shape(model.get_submodule(n))
        fixed_bits += layer_bits(base[n], out_f, in_f, ignore)
        numel[n] = out_f * in_f
    total_numel = sum(numel.values())
    groups = build_groups(names, block_groups, auto.shared_layers or (), share_fused=auto.share_fused_layers)
    k = len(auto.schemes)
    lo = fixed_bits + sum(min(sum(costs[n][j] for n in g) for j in range(k)) for g in groups)
    hi = fixed_bits + sum(max(sum(costs[n][j] for n in g) for j in range(k)) for g in groups)
    # layers no option fits (shape rule) stay in fp whatever the plan: they count 16 bits, which the range shows
    always_fp = [n for n in names if not any(s.is_quantized for s in per_layer[n])]
    for t in auto.targets:
        if math.floor(total_numel * t) < lo or t > hi / total_numel + 1e-12:
            raise AutoSchemeError(
                f"AutoScheme avg_bits={t:g} is outside the achievable range [{lo / total_numel:.4f}, "
                f"{hi / total_numel:.4f}] for options {', '.join(auto.labels)}"
                + (" and the fixed layers" if fixed else "")
                + (f"; layers no option fits by shape stay in fp and count 16 bits: {_some(always_fp)} "
                   f"({sum(numel[n] for n in always_fp) / total_numel:.1%} of the weights)" if always_fp else "")
                + "; choose a target inside it or other options")
    option_layers = [{n: (model.get_submodule(n), per_layer[n][j]) for n in names if per_layer[n][j].is_quantized}
                     for j in range(k)]
    scores = score_fn(option_layers) if k > 1 else [{} for _ in range(k)]
    layer_scores = {n: [float(scores[j].get(n, 0.0)) for j in range(k)] for n in names}
    items = [Item(name=g[0], costs=tuple(sum(costs[n][j] for n in g) for j in range(k)),
                  losses=tuple(sum(layer_scores[n][j] for n in g) for j in range(k))) for g in groups]
    plans = []
    for t in auto.targets:
        budget = math.floor(total_numel * t)
        sol = solve(items, budget - fixed_bits)
        choice = {n: j for g, j in zip(groups, sol.choice) for n in g}
        choice = {n: choice[n] for n in names}  # model order
        schemes = dict(base)
        schemes.update({n: per_layer[n][j] for n, j in choice.items()})
        plans.append(AutoSchemePlan(
            target=t, budget_bits=budget, total_bits=fixed_bits + sol.total_bits, total_numel=total_numel,
            fixed_bits=fixed_bits, labels=auto.labels, layer_schemes=schemes, choice=choice, groups=groups,
            scores=layer_scores, share_fused_layers=auto.share_fused_layers, score=auto.score))
    return plans


def plans_json(plans: Sequence[AutoSchemePlan]) -> str:
    """autoscheme_plan.json: the first plan is the one quantized with."""
    return json.dumps({"quantized_with": plans[0].target, "plans": [p.to_json() for p in plans]}, indent=2)


def calibration_ids(auto: AutoScheme, tokenizer: Any, dataset: Any, seed: int, max_len: int):
    """(input_ids, attention_mask) [n, T] for the scoring: AutoScheme's dataset, else AutoRound's."""
    data = auto.dataset if auto.dataset is not None else dataset
    seqlen = min(auto.seqlen, max_len)
    if isinstance(data, torch.Tensor):
        ids = data.long()[: auto.nsamples, :seqlen]
        return ids, torch.ones_like(ids)
    if tokenizer is None:
        raise AutoSchemeError("AutoScheme scores layers on calibration text: pass a tokenizer (or token ids as dataset)")
    from .calib_data import build_calibration_set

    calib = build_calibration_set(tokenizer, data, seqlen=seqlen, nsamples=auto.nsamples, seed=seed)
    return calib.input_ids, calib.attention_mask
