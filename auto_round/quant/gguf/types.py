"""The ggml quantization types we produce, and the frozen parameters of one quantized weight.

A weight W [out, in] is cut along `in` into ggml blocks of `block` elements (32 for the legacy types,
256 for k-quants); each block is cut into sub-blocks of `sub` elements that share one scale:

    sym  types: W^ = scale * q            q signed, code = q + zero (ggml's unsigned codes; q8_0 stores q as int8)
    asym types: W^ = scale * q - offset   q in [0, 2^bits - 1], stored as is

Legacy types store the scale (and the q4_1/q5_1 min m, offset = -m) as one fp16 per block. K-quants
store one fp16 `d` (and `dmin`) per 256-element super-block plus small integer codes per sub-block
("double quant"): scale = d * sc, offset = dmin * m, each product a float32 multiply exactly as
gguf-py's dequantizer does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

QK_K = 256  # elements per k-quant super-block (ggml-common.h)


@dataclass(frozen=True)
class GGMLType:
    """One ggml quantization type (see module docstring)."""

    name: str  # "q4_k"
    bits: int  # element bits
    block: int  # elements per ggml block along in_features
    sub: int  # elements sharing one scale
    sym: bool  # True: W^ = scale*q (q signed); False: W^ = scale*q - offset
    kquant: bool
    super_bits: Optional[int]  # bits of the quantized sub-block scales (k-quants only)

    @property
    def qmin(self) -> int:
        """Smallest q (the signed value the scale multiplies)."""
        return -(1 << (self.bits - 1)) if self.sym else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.sym else (1 << self.bits) - 1

    @property
    def zero(self) -> int:
        """Code of q = 0: codes = q + zero, unsigned for every type (q8_0: 128; ggml stores its q as int8)."""
        return 1 << (self.bits - 1) if self.sym else 0

    @property
    def type_size(self) -> int:
        """Bytes of one packed block (ggml's type_size): the element codes, the fp16 d (and dmin / m of the
        asym types) and, for k-quants, the sub-block scales (and mins) of `super_bits` each."""
        size = self.block * self.bits // 8 + (2 if self.sym else 4)
        if self.kquant:
            size += self.subs_per_block * self.super_bits * (1 if self.sym else 2) // 8
        return size

    @property
    def subs_per_block(self) -> int:
        return self.block // self.sub

    @property
    def sc_range(self) -> tuple[int, int]:
        """Range of the integer sub-block scale multiplier sc (k-quants): scale = d * sc."""
        if self.super_bits is None:
            raise ValueError(f"{self.name} has no quantized sub-block scales")
        if self.sym:
            return -(1 << (self.super_bits - 1)), (1 << (self.super_bits - 1)) - 1
        return 0, (1 << self.super_bits) - 1


GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("q4_0", 4, 32, 32, True, False, None),
        GGMLType("q4_1", 4, 32, 32, False, False, None),
        GGMLType("q5_0", 5, 32, 32, True, False, None),
        GGMLType("q5_1", 5, 32, 32, False, False, None),
        GGMLType("q8_0", 8, 32, 32, True, False, None),
        GGMLType("q2_k", 2, QK_K, 16, False, True, 4),
        GGMLType("q3_k", 3, QK_K, 16, True, True, 6),
        GGMLType("q4_k", 4, QK_K, 32, False, True, 6),
        GGMLType("q5_k", 5, QK_K, 32, False, True, 6),
        GGMLType("q6_k", 6, QK_K, 16, True, True, 8),
    )
}


def ggml_type(name: str) -> GGMLType:
    """The GGMLType called `name` (case-insensitive); ValueError listing the valid names otherwise."""
    t = GGML_TYPES.get(str(name).lower())
    if t is None:
        raise ValueError(f"unknown ggml quantization type {name!r}; valid: {', '.join(GGML_TYPES)}")
    return t


def check_weight_shape(t: GGMLType, shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, in) of a 2-D weight whose in_features is a positive multiple of the type's block."""
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1 or shape[1] % t.block:
        raise ValueError(
            f"{t.name} needs a 2-D weight [out, in] with in a multiple of {t.block}; got shape {tuple(shape)}"
        )
    return int(shape[0]), int(shape[1])


@dataclass
class GGUFParams:
    """Frozen quantization parameters of one [out, in] weight (in % block == 0). All float tensors float32.

    scale  [out, in // sub]   what each sub-block dequantizes with (fp16 d for legacy, float32(d * sc) k-quants)
    offset [out, in // sub]   W^ = scale*q - offset (float32(dmin * m) k-quants, -m for q4_1/q5_1); None if sym
    d      [out, n_blocks]    fp16-representable block (legacy) or super-block (k-quant) scale
    dmin   [out, n_blocks]    k-quant asym: fp16 super-block min scale; q4_1/q5_1: the fp16 block min m
    sc     int [out, in//sub] k-quants: signed integer multiplier, scale == d * sc (q3_k stores sc + 32)
    m      int [out, in//sub] asym k-quants: min codes, offset == dmin * m
    """

    qtype: str
    scale: torch.Tensor
    offset: Optional[torch.Tensor]
    d: torch.Tensor
    dmin: Optional[torch.Tensor]
    sc: Optional[torch.Tensor]
    m: Optional[torch.Tensor]


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest fp16 value (ties to even, as GGML_FP32_TO_FP16), back in float32.

    Values beyond the fp16 range saturate at +-65504 instead of becoming inf, so a file never holds inf.
    """
    return x.clamp(-65504.0, 65504.0).to(torch.float16).to(torch.float32)


def build_params(
    qtype: str,
    d: torch.Tensor,
    dmin: Optional[torch.Tensor] = None,
    sc: Optional[torch.Tensor] = None,
    m: Optional[torch.Tensor] = None,
) -> GGUFParams:
    """GGUFParams from the stored fields, computing scale/offset with gguf-py's float32 operations."""
    t = ggml_type(qtype)
    d = d.to(torch.float32)
    dmin = None if dmin is None else dmin.to(torch.float32)
    if not t.kquant:
        offset = None if t.sym else -dmin
        return GGUFParams(t.name, d, offset, d, dmin, None, None)
    sc = sc.to(torch.int32)
    per_sub = d.repeat_interleave(t.subs_per_block, dim=-1)  # [out, in // sub]
    scale = per_sub * sc.to(torch.float32)
    offset = None
    if not t.sym:
        m = m.to(torch.int32)
        offset = dmin.repeat_interleave(t.subs_per_block, dim=-1) * m.to(torch.float32)
    return GGUFParams(t.name, scale, offset, d, None if t.sym else dmin, sc, None if t.sym else m)
