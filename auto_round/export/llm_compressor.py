"""The `llm_compressor` format for integer weight-only schemes: compressed-tensors "pack-quantized"
(reference §4.4), what vLLM and transformers load through the compressed-tensors integration.

Per quantized Linear:
    weight_packed      int32 [out, in*b/32]   codes along in, little-endian bit stream (32 values per b words)
    weight_scale       [out, n_groups]        scale dtype (fp16 by default)
    weight_shape       int64 [2]              (out, in)
    weight_zero_point  int32 [out*b/32, n_groups], asym only: zp - 2^(b-1) (compressed-tensors' signed zero
                       point), stored + 2^(b-1) again and packed along out, as compressed-tensors packs it
compressed-tensors keeps signed integers x = code - 2^(b-1) and dequantizes (x - zp_signed) * scale, which
is our scale * (code - zp). A sym scale may be negative (full-range sym); the product is the same.

quantization_config: one config group per (bits, group_size, sym); the most common one targets "Linear",
the others name their layers exactly (exact names win over class targets in compressed-tensors). Every
other Linear is listed in `ignore`. "format" is "pack-quantized", or "mixed-precision" with several groups.

MX / NVFP4 / FP8 weights and activation-quantized schemes (INT8 W8A8, ...) use the other compressed-tensors
layouts (llm_compressor_float.py); every config group then carries its own "format" and `input_activations`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..algorithms.float_tunable import FloatQuantResult
from ..algorithms.tunable import LayerQuantResult
from ..layers import is_conv1d, is_quantizable
from ..packing.bitstream import pack_last_dim
from ..schemes import QuantScheme
from .checkpoint import quantized_state_dict, scales_and_zeros, write_checkpoint
from .context import ExportContext
from .llm_compressor_float import (BF16_ONLY_FORMATS, ct_format, ct_misfit, input_args, pack_float_layer,
                                   pack_int_quantized_layer, weights_args)
from .writer import ExportError

logger = logging.getLogger("auto_round")



def check_llm_compressor(layers: dict[str, tuple[QuantScheme, int]], conv1d: frozenset = frozenset()) -> None:
    """Before tuning: schemes compressed-tensors has a layout for, whole groups, nn.Linear layers (compressed-tensors
    packs no Conv1D)."""
    for name, (scheme, in_features) in layers.items():
        problem = ct_misfit(scheme, in_features)
        if problem:
            raise ExportError(f"llm_compressor cannot hold {name}: {problem}")
        if name in conv1d:
            raise ExportError(f"llm_compressor (compressed-tensors) packs nn.Linear only; {name} is a Conv1D")


def pack_ct_layer(name: str, res: "LayerQuantResult | FloatQuantResult",
                  scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    if isinstance(res, FloatQuantResult):
        return pack_float_layer(name, res, scale_dtype)
    if res.scheme.quantizes_activations:
        return pack_int_quantized_layer(name, res, scale_dtype)
    scales, zeros = scales_and_zeros(name, res, scale_dtype)  # [n_groups, out]
    bits = res.scheme.bits
    tensors = {
        f"{name}.weight_packed": pack_last_dim(res.codes, bits),
        f"{name}.weight_scale": scales.t().contiguous(),
        f"{name}.weight_shape": torch.tensor([res.layout.out_features, res.layout.in_features], dtype=torch.int64),
    }
    if not res.scheme.sym:
        tensors[f"{name}.weight_zero_point"] = pack_last_dim(zeros, bits).t().contiguous()
    return tensors


def _group_entry(scheme: QuantScheme) -> dict[str, Any]:
    return {"format": ct_format(scheme), "input_activations": input_args(scheme), "output_activations": None,
            "weights": weights_args(scheme)}


def _key(scheme: QuantScheme) -> str:
    return json.dumps(_group_entry(scheme), sort_keys=True)


def ct_config(ctx: ExportContext) -> dict[str, Any]:
    by_key: dict[str, list[str]] = {}
    for name, res in ctx.results.items():
        by_key.setdefault(_key(res.scheme), []).append(name)
    main = Counter({k: len(v) for k, v in by_key.items()}).most_common(1)[0][0]
    ordered = [main] + sorted(k for k in by_key if k != main)
    groups = {}
    for i, key in enumerate(ordered):
        targets = ["Linear"] if key == main else sorted(by_key[key])
        groups[f"group_{i}"] = {**_group_entry(ctx.results[by_key[key][0]].scheme), "targets": targets}
    ignore = sorted(name for name, module in ctx.model.named_modules()
                    if name and is_quantizable(module) and name not in ctx.results)
    return {
        "config_groups": groups,
        "format": groups["group_0"]["format"] if len(groups) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "provider": "auto-round",
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def save_llm_compressor(ctx: ExportContext, directory: Path) -> dict:
    conv1d = frozenset(n for n in ctx.results if is_conv1d(ctx.model.get_submodule(n)))
    check_llm_compressor({n: (r.scheme, r.layout.in_features) for n, r in ctx.results.items()}, conv1d)
    scale_dtype = torch.float16 if ctx.scale_dtype_name == "torch.float16" else torch.float32
    state = quantized_state_dict(ctx, lambda name, res: pack_ct_layer(name, res, scale_dtype))
    qconfig = ct_config(ctx)
    # MX / NVFP4 weights decompress to bf16 only, so the model runs in bf16: the config says so (a plain
    # from_pretrained(dir) then works), as the reference declares bf16 for 4/8-bit activations; the other
    # tensors keep the source's dtype (an fp32 source stays exact for a decompressed fp32 load)
    bf16_only = any(ct_format(r.scheme) in BF16_ONLY_FORMATS for r in ctx.results.values())
    write_checkpoint(ctx, directory, state, qconfig, dtype=torch.bfloat16 if bf16_only else None)
    logger.info("packed %d quantized layers as compressed-tensors %s", len(ctx.results), qconfig["format"])
    return qconfig

