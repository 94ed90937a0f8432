"""AutoRound's AutoScheme step: score the options, allocate, and make the plan the layers' schemes.

Kept out of compressor.py; `AutoRound` calls `plan_layers` once, lazily (quantize / the export checks),
because the scoring runs the model forward and backward on calibration text.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .algorithms.autoscheme import AutoScheme, AutoSchemeError
from .algorithms.fused import mixed_groups
from .model.autoscheme_plan import AutoSchemePlan, allocate, calibration_ids, most_common_scheme, plans_json
from .model.autoscheme_fisher import fisher_scores
from .model.autoscheme_score import delta_loss_scores
from .model.blocks import iter_blocks
from .model.gguf_plan import split_embedding_choice
from .model.layer_config import fixed_layer_names
from .model.setup import clamp_seqlen

if TYPE_CHECKING:
    from .compressor import AutoRound

logger = logging.getLogger("auto_round")


def check_auto_scheme_args(auto: AutoScheme, overrides: dict) -> None:
    """Errors AutoRound can raise before loading anything else."""
    given = sorted(k for k, v in overrides.items() if v is not None)
    if given:
        raise AutoSchemeError(f"{', '.join(given)} cannot be combined with scheme=AutoScheme(...): put these fields "
                              "in the AutoScheme options instead")


def check_auto_scheme_data(auto: AutoScheme, tokenizer, dataset) -> None:
    """Scoring needs text to tokenize or token ids (checked once the model's tokenizer is loaded)."""
    data = auto.dataset if auto.dataset is not None else dataset
    if len(auto.schemes) > 1 and tokenizer is None and not isinstance(data, torch.Tensor):
        raise AutoSchemeError("AutoScheme scores layers on calibration text: pass a tokenizer (or token ids as dataset)")


def plan_layers(ar: "AutoRound") -> list[AutoSchemePlan]:
    """Score, allocate, and set ar.layer_schemes / ar.scheme to the first target's plan."""
    auto: AutoScheme = ar.auto_scheme
    choices = ar._layer_choices
    layer_config, fp_layers = choices["layer_config"], choices["fp_layers"]
    if ar.gguf is not None:  # the token embedding's entries are not block layers (model/gguf_plan.py)
        layer_config, fp_layers, _ = split_embedding_choice(ar.model, layer_config, fp_layers)
    fixed = fixed_layer_names(list(ar.layer_schemes), layer_config, fp_layers)
    if auto.is_gguf:  # output.weight keeps its mix's type (q6_k for the k-quant mixes), as llama.cpp gives it
        fixed |= {n for n in ar.layer_schemes if not any(n.startswith(g + ".") for g in ar.block_groups)}

    def score(option_layers):
        if len(ar.block_groups) != 1:
            raise NotImplementedError(f"AutoScheme over several block groups ({ar.block_groups}) is not supported "
                                      "yet; pass to_quant_block_names with one of them")
        max_len = clamp_seqlen(auto.seqlen, ar.model, ar.tokenizer)
        ids, mask = calibration_ids(auto, ar.tokenizer, ar.dataset, ar.seed, max_len)
        logger.info("AutoScheme: scoring %d options on %d samples x %d tokens", len(option_layers), *ids.shape)
        ar.model.eval()
        for p in ar.model.parameters():
            p.requires_grad_(False)
        blocks = list(iter_blocks(ar.model, ar.block_groups))
        scorer = fisher_scores if auto.score == "fisher" else delta_loss_scores
        return scorer(ar.model, blocks, option_layers, ids, mask, batch_size=auto.resolved_batch_size,
                      device=ar.device, scale_dtype=ar.scale_dtype, gguf_imatrix=ar.tuning.iters > 0 or not ar.disable_opt_rtn)

    plans = allocate(auto, ar.model, ar.block_groups, ar.layer_schemes, fixed, score)
    for plan in plans:
        logger.info("AutoScheme plan (target %g bits):\n%s", plan.target, plan.table())
    split = split_fused_groups(plans[0])
    if split and not auto.is_gguf:  # llama.cpp reads q/k/v, gate/up as separate tensors of any types
        logger.warning("AutoScheme (share_fused_layers=False): %d fused groups got mixed options (e.g. %s): "
                       "transformers and auto-round load this checkpoint, runtimes that fuse q/k/v or gate/up "
                       "(vLLM) do not", len(split), ", ".join(split[0]))
    ar.layer_schemes = plans[0].layer_schemes
    if ar.gguf is not None:  # the GGUF writer and the embedding pass read the plan's types
        ar.gguf.layer_schemes = ar.layer_schemes
    ar.scheme = most_common_scheme(ar.layer_schemes)
    return plans


def split_fused_groups(plan: AutoSchemePlan) -> list[list[str]]:
    """The fused groups (q/k/v, gate/up of one parent) whose members the plan gave different options."""
    return mixed_groups(plan.choice)


def plan_files(plans: list[AutoSchemePlan]) -> dict[str, str]:
    return {"autoscheme_plan.json": plans_json(plans)} if plans else {}


def plan_run_info(plans: list[AutoSchemePlan]) -> dict:
    return {"targets": [p.target for p in plans], "achieved_avg_bits": [p.achieved_avg_bits for p in plans],
            "options": list(plans[0].labels), "quantized_with": plans[0].target}
