"""FP8 block-quantized source checkpoints (DeepSeek-V3 / R1, Kimi-K2, Qwen3-FP8 and others ship this way), read
back to float weights so model-free RTN can quantize them to another scheme.

The layout (transformers' FineGrainedFP8, our `fp8` format): per quantized Linear `weight` float8_e4m3fn [out, in]
and `weight_scale_inv` [ceil(out / bm), ceil(in / bn)], the dequantization multiplier of each (bm, bn) block
despite its name: W = weight * weight_scale_inv, block by block. config.json's quantization_config says
`quant_method: "fp8"` and `weight_block_size: [bm, bn]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch

from .safetensors_header import TensorEntry

SCALE_SUFFIX = ".weight_scale_inv"
FP8_DTYPES = ("F8_E4M3",)


def fp8_block_size(quantization_config: Any) -> Optional[tuple[int, int]]:
    """(bm, bn) of a FineGrainedFP8 quantization_config (dict or object); None for any other config."""
    qc = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else dict(quantization_config or {})
    if str(qc.get("quant_method", "")).lower() != "fp8":
        return None
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        return None
    return int(block[0]), int(block[1])


def fp8_pairs(entries: Mapping[str, TensorEntry]) -> dict[str, str]:
    """fp8 weight name -> its weight_scale_inv name, for every fp8 `.weight` stored with one."""
    return {name: name[: -len(".weight")] + SCALE_SUFFIX for name, e in entries.items()
            if name.endswith(".weight") and e.dtype in FP8_DTYPES and name[: -len(".weight")] + SCALE_SUFFIX in entries}


def logical_entries(entries: Mapping[str, TensorEntry], pairs: Mapping[str, str], dtype: str) -> dict[str, TensorEntry]:
    """The checkpoint as its float model: each paired fp8 weight as a `dtype` ("BF16", "F32") tensor of the same
    shape, the scales left out (they are part of their weights)."""
    scales = set(pairs.values())
    out = {}
    for name, entry in entries.items():
        if name in scales:
            continue
        out[name] = dataclasses.replace(entry, dtype=dtype) if name in pairs else entry
    return out


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight (fp8 [out, in]) * scale_inv ([ceil(out/bm), ceil(in/bn)]) per block, in fp32 [out, in]."""
    out_f, in_f = weight.shape
    bm, bn = block
    rows, cols = -(-out_f // bm), -(-in_f // bn)
    if tuple(scale_inv.shape) != (rows, cols):
        raise ValueError(f"weight_scale_inv of shape {tuple(scale_inv.shape)} does not match a [{out_f}, {in_f}] "
                         f"weight in blocks of {bm}x{bn} (expected [{rows}, {cols}])")
    if out_f % bm == 0 and in_f % bn == 0:  # block views: no full-size scale tensor
        blocks = weight.float().view(rows, bm, cols, bn)
        return blocks.mul_(scale_inv.float().view(rows, 1, cols, 1)).view(out_f, in_f)
    scale = scale_inv.float().repeat_interleave(bm, 0)[:out_f].repeat_interleave(bn, 1)[:, :in_f]
    return weight.float() * scale
