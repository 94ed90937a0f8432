"""4-bit matmul on CPU through torch's packed-int4 kernel (`aten._weight_int4pack_mm_for_cpu`).

The kernel stores codes q in [0, 15] two per byte and computes W = (q - 8) * scale + zero per group of
`group` input channels, with scale/zero [n_groups, out, 2]. Our checkpoints hold W = s * (q - z), which is
the same with zero = s * (8 - z) (formed in fp32, then stored in bf16 like the activations).

Decoding is bound by memory traffic, and int4 weights move 4x fewer bytes than bf16, so this is what
makes a W4 model faster than the float one on a CPU. The kernel is fast only for bf16 activations (measured
here with torch 2.13 on AVX-512: fp32 and fp16 inputs take a path 10-70x slower than a float matmul), so it
serves layers whose compute dtype is bf16; fp32 models keep the exact dequantized-weight path.
The kernel needs the input channels to be a whole number of groups of 32/64/128/256: a ragged last group (e.g. 576 channels at group 128) is handled by
zero-padding the codes' input channels and the activations to the next multiple of the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_GROUPS = (32, 64, 128, 256)
_INNER_K_TILES = 2  # the CPU kernel ignores the tiling argument beyond validation; 2 is accepted for any K % 32 == 0


def kernel_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def int4_problem(bits: int, group_size: int, in_features: int, out_features: int, has_g_idx_permutation: bool,
                 dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why the int4 CPU kernel should not run this layer, or None."""
    if not kernel_available():
        return "this torch build has no _weight_int4pack_mm_for_cpu"
    if dtype != torch.bfloat16:
        return f"compute dtype {dtype} (the kernel is fast for bf16 only)"
    if bits != 4:
        return f"{bits}-bit weights"
    if group_size not in SUPPORTED_GROUPS:
        return f"group_size {group_size} (kernel supports {SUPPORTED_GROUPS})"
    if has_g_idx_permutation:
        return "g_idx reorders the input channels"
    if out_features % 16:
        return f"out_features {out_features} not a multiple of 16"
    return None


@dataclass
class Int4Weight:
    """Kernel-ready weight of one layer: packed uint8 [out, K_pad/2], scale_zero bf16 [n_groups, out, 2]."""

    packed: torch.Tensor
    scale_zero: torch.Tensor
    group: int
    in_features: int
    padded_in: int


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> Int4Weight:
    """codes int [out, in] in [0, 15]; scales, zeros [n_groups, out] (W = s * (q - z)) -> `Int4Weight`."""
    out_features, in_features = codes.shape
    n_groups = -(-in_features // group)
    padded = n_groups * group
    q = codes.to(torch.int32)
    if padded != in_features:  # padded channels meet zero activations: any code works, 8 keeps it tidy
        q = F.pad(q, (0, padded - in_features), value=8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), _INNER_K_TILES)
    s = scales.to(torch.float32)  # zero = s * (8 - z) formed in fp32, then rounded once to bf16
    scale_zero = torch.stack([s, s * (8.0 - zeros.to(torch.float32))], dim=-1).to(torch.bfloat16).contiguous()
    return Int4Weight(packed, scale_zero, group, in_features, padded)


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype; computed with bf16 activations (the kernel's fast path)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if weight.padded_in != weight.in_features:
        x2 = F.pad(x2, (0, weight.padded_in - weight.in_features))
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), weight.packed, weight.group, weight.scale_zero)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*lead, out.shape[-1])
