"""`quantization_config` for auto_round checkpoints, with the reference's default filtering.

Keys equal to the reference defaults are dropped (iters 200, nsamples 128, seqlen 2048, batch_size 8,
lr = minmax_lr = 1/iters, ...), so a default W4A16 run writes only bits, group_size, sym, data_type,
packing_format, block_name_to_quantize, quant_method and autoround_version. Per-layer differences go to
`extra_config`: in-block layers list only the keys that differ, layers outside the blocks (lm_head) list
every scheme key, fp layers inside blocks get {"bits": 16, "data_type": "fp"}.
"""

from __future__ import annotations

from typing import Any

from ..schemes import QuantScheme
from ..version import __version__
from .context import ExportContext

SCHEME_KEYS = ("bits", "group_size", "sym", "data_type")

_TUNING_DEFAULTS: dict[str, Any] = {
    "amp": True,
    "batch_size": 8,
    "enable_adam": False,
    "enable_alg_ext": False,
    "enable_minmax_tuning": True,
    "enable_norm_bias_tuning": False,
    "enable_quanted_input": True,
    "gradient_accumulate_steps": 1,
    "iters": 200,
    "low_gpu_mem_usage": False,
    "nsamples": 128,
    "scale_dtype": "torch.float16",
    "seqlen": 2048,
}


def _default_lr(iters: int) -> float:
    return 1.0 / iters if iters > 0 else 5e-3


def filter_tuning(tuning: dict[str, Any]) -> dict[str, Any]:
    """Drop None values and values equal to the reference defaults."""
    iters = tuning.get("iters", 200)
    kept = {}
    for key, value in tuning.items():
        if value is None:
            continue
        if key in _TUNING_DEFAULTS and value == _TUNING_DEFAULTS[key]:
            continue
        if key in ("lr", "minmax_lr") and abs(float(value) - _default_lr(iters)) < 1e-12:
            continue
        kept[key] = value
    return kept


def export_group_size(scheme: QuantScheme) -> int:
    """Per-tensor (0) is written as per-channel (-1) with identical scales: loaders accept only -1 or > 0. A 2-D
    block (FP8, (rows, cols)) is written as its column count, with the block in `weight_block_size`."""
    if isinstance(scheme.group_size, tuple):
        return scheme.group_size[1]
    return -1 if scheme.group_size == 0 else scheme.group_size


ACT_KEYS = ("act_bits", "act_data_type", "act_group_size", "act_sym", "act_dynamic")


def quantizes_activations(ctx: ExportContext) -> bool:
    return any(s.is_quantized and s.quantizes_activations for s in ctx.layer_schemes.values())


def scheme_entry(scheme: QuantScheme, act: bool = False) -> dict[str, Any]:
    """The config keys of a scheme; `act`: the act_* keys too (models with quantized activations only, as the
    reference drops every act_* key when act_bits >= 16)."""
    if not scheme.is_quantized:
        return {"bits": 16, "data_type": "fp"}
    entry = {"bits": scheme.bits, "group_size": export_group_size(scheme), "sym": scheme.sym,
             "data_type": scheme.data_type}
    if isinstance(scheme.group_size, tuple):
        entry["weight_block_size"] = list(scheme.group_size)
    if scheme.data_type == "fp":  # the FP8 element format, named as the reference and vLLM's fp8 configs do
        entry["fmt"] = "e4m3"
    if act:
        entry["act_bits"] = scheme.act_bits
        if scheme.quantizes_activations:
            entry.update(act_data_type=scheme.resolved_act_data_type, act_group_size=scheme.resolved_act_group_size,
                         act_sym=scheme.resolved_act_sym, act_dynamic=scheme.act_dynamic)
            if scheme.data_type == "fp":
                entry["activation_scheme"] = "dynamic" if scheme.act_dynamic else "static"
    return entry


def build_extra_config(ctx: ExportContext) -> dict[str, dict[str, Any]]:
    act = quantizes_activations(ctx)
    base = scheme_entry(ctx.scheme, act)
    extra: dict[str, dict[str, Any]] = {}
    for name, scheme in ctx.layer_schemes.items():
        # fmt / activation_scheme are top-level descriptors (data_type + bits + act_dynamic say the same per layer)
        entry = {k: v for k, v in scheme_entry(scheme, act).items() if k not in ("fmt", "activation_scheme")}
        if not ctx.in_block(name):
            if scheme.is_quantized:
                extra[name] = entry
            continue
        if not scheme.is_quantized:
            extra[name] = entry
            continue
        diff = {k: v for k, v in entry.items() if base.get(k) != v}
        if diff:
            extra[name] = diff
    return extra


def base_config(ctx: ExportContext) -> dict[str, Any]:
    """The keys every format built on auto-round's config shares: version, main scheme, non-default tuning."""
    return {
        "autoround_version": __version__,
        **scheme_entry(ctx.scheme, quantizes_activations(ctx)),
        **filter_tuning({**ctx.tuning, "scale_dtype": ctx.scale_dtype_name}),
    }


def build_quantization_config(ctx: ExportContext, packing_format: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        **base_config(ctx),
        "quant_method": "auto-round",
        "packing_format": packing_format,
        "block_name_to_quantize": ",".join(ctx.block_groups),
    }
    extra = build_extra_config(ctx)
    if extra:
        config["extra_config"] = extra
    return dict(sorted(config.items()))
