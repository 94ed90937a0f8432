"""The `fake` format: the fake-quantized model saved as a plain floating-point checkpoint.

Weight-only schemes: no quantization_config is written, so any runtime loads it as an ordinary model; the weights
already sit on the quantization grid. Useful for research schemes and for checking accuracy without a kernel.

With quantized activations (reference §4.7) the weights alone would not reproduce the model, so the config says
quant_method "auto-round", packing_format "auto_round:fake" plus the scheme keys (act_* included, per-layer
differences in extra_config), and every statically quantized layer stores its calibrated input range
`<layer>.act_max` (fp32 [1], the tuned clip applied). Our loader (inference/fake_act.py, through transformers'
AutoRoundQuantizer) puts the activation quantizers back on load: the loaded model computes what the in-memory
one does, bit for bit.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from .context import ExportContext
from .quant_config import build_quantization_config, quantizes_activations
from .writer import ExportError, save_generation_config, save_tokenizer, tied_parameter_names, write_safetensors

logger = logging.getLogger("auto_round")

FAKE_PACKING = "auto_round:fake"


def act_max_tensors(ctx: ExportContext) -> dict[str, torch.Tensor]:
    """`<layer>.act_max` [1] fp32 of every layer whose activations are quantized with a calibrated range."""
    from ..algorithms.act_quant import needs_act_calibration

    tensors = {}
    for name, res in ctx.results.items():
        if not needs_act_calibration(res.scheme):
            continue
        if res.act_max is None:
            raise ExportError(f"{name}: static activation quantization without a calibrated range (act_max)")
        tensors[f"{name}.act_max"] = res.act_max.detach().float().reshape(1).clone()
    return tensors


def save_fake(ctx: ExportContext, directory: Path) -> dict:
    config = copy.deepcopy(ctx.model.config)
    qconfig: dict = {}
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tied = tied_parameter_names(ctx.model)
    state = {k: v for k, v in ctx.model.state_dict().items() if k not in tied}
    if ctx.source_dtypes is not None:  # the fake-quantized weights too, as the reference's model dtype holds them
        state = ctx.source_dtypes.cast(state)
        config.dtype = ctx.source_dtypes.config_dtype
    if quantizes_activations(ctx):
        qconfig = build_quantization_config(ctx, FAKE_PACKING)
        config.quantization_config = qconfig
        state.update(act_max_tensors(ctx))
    config.save_pretrained(str(directory))
    write_safetensors(state, directory, ctx.max_shard_size)
    if qconfig:
        (directory / "quantization_config.json").write_text(json.dumps(qconfig, indent=2))
    save_generation_config(ctx.model, directory)
    save_tokenizer(ctx.tokenizer, directory)
    logger.info("wrote the fake-quantized checkpoint%s", " (activation quantization: auto_round:fake)" if qconfig else "")
    return qconfig
