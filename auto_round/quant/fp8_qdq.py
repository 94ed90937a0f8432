"""FP8 (E4M3, optionally E5M2) weight qdq per tensor, per channel, per group or per 2-D block.

Pure tensor math: no model, I/O or logging. One function serves every granularity: the weight is
first viewed as [rows, n_groups, group] by a layout, then each group gets one fp32 scale:

    amax  = max(|wmax|, |wmin|) * max_scale          (wmin <= 0 <= wmax, the group range)
    scale = max(amax / 448, 1 / (448 * 512))          (fp32; 57344 instead of 448 for e5m2)
    q     = fp8( clamp(W / scale + V, -448, 448) )    (torch cast, round to nearest even, STE)
    W^    = q * scale

Layouts (`fp8_layout`):
    granularity 0        per tensor   [1, 1, out*in]                 (GroupLayout, G = 0; FPW8A16)
    granularity -1       per channel  [out, 1, in]                   (GroupLayout, G = -1; FP8_STATIC)
    granularity G > 0    per group    [out, ceil(in/G), G]           (GroupLayout)
    (bm, bn), e.g. (128, 128)  blocks [ceil(out/bm), ceil(in/bn), bm*bn]   (BlockLayout; FP8_BLOCK)
Ragged shapes are zero-padded to whole groups / blocks (zeros never change a group's amax) and the
padding is dropped again; the block scale grid is [ceil(out/bm), ceil(in/bn)], as DeepSeek-style
`weight_scale_inv` and compressed-tensors' block strategy expect.

W8A8 INT8 weights (int sym, per channel) are `int_qdq.qdq_int_sym` with group_size -1; nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .int_qdq import GroupLayout, group_range

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_MIN_SCALE = 1.0 / (448.0 * 512.0)

Granularity = Union[int, tuple[int, int]]


@dataclass(frozen=True)
class BlockLayout:
    """A [out, in] weight as 2-D blocks: [rows = ceil(out/bm), n_groups = ceil(in/bn), group = bm*bn].

    Same interface as `GroupLayout`. Inside a block, elements are in row-major (bm, bn) order.
    """

    out_features: int
    in_features: int
    block_rows: int
    block_cols: int

    @property
    def rows(self) -> int:
        return -(-self.out_features // self.block_rows)

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.block_cols)

    @property
    def group(self) -> int:
        return self.block_rows * self.block_cols

    @property
    def grouped_shape(self) -> tuple[int, int, int]:
        return (self.rows, self.n_groups, self.group)

    def to_groups(self, w: torch.Tensor) -> torch.Tensor:
        """[out, in] -> [R, C, bm*bn], zero-padding the ragged bottom rows / right columns."""
        bm, bn = self.block_rows, self.block_cols
        pad_r, pad_c = self.rows * bm - self.out_features, self.n_groups * bn - self.in_features
        if pad_r or pad_c:
            w = torch.nn.functional.pad(w, (0, pad_c, 0, pad_r))
        w = w.reshape(self.rows, bm, self.n_groups, bn).transpose(1, 2)  # (R, C, bm, bn)
        return w.reshape(self.grouped_shape)

    def from_groups(self, g: torch.Tensor) -> torch.Tensor:
        """[R, C, bm*bn] -> [out, in], dropping the padding."""
        bm, bn = self.block_rows, self.block_cols
        w = g.reshape(self.rows, self.n_groups, bm, bn).transpose(1, 2)  # (R, bm, C, bn)
        w = w.reshape(self.rows * bm, self.n_groups * bn)
        return w[: self.out_features, : self.in_features]

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """[R, C] -> [out, in]: each element gets its block's value."""
        return self.from_groups(per_group.unsqueeze(-1).expand(self.grouped_shape))


def fp8_layout(out_features: int, in_features: int, granularity: Granularity):
    """GroupLayout for an int granularity (0, -1, G > 0), BlockLayout for a (bm, bn) tuple."""
    if isinstance(granularity, (tuple, list)):
        bm, bn = granularity
        if bm <= 0 or bn <= 0:
            raise ValueError(f"block sizes must be positive, got {granularity}")
        return BlockLayout(out_features, in_features, int(bm), int(bn))
    return GroupLayout(out_features, in_features, int(granularity))


def fp8_ste(x: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    """Round through a torch float8 cast (nearest, ties to even), identity gradient."""
    return (x.detach().to(FP8_DTYPES[fmt]).float() - x).detach() + x


def fp8_scale(amax: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    """max(amax / fp8_max, 1 / (448 * 512)) in fp32; amax any shape (already times max_scale)."""
    return torch.clamp(amax.float() / FP8_MAX[fmt], min=FP8_MIN_SCALE)


def fp8_group_scale(wmin: torch.Tensor, wmax: torch.Tensor, max_scale: Optional[torch.Tensor] = None,
                    fmt: str = "e4m3") -> torch.Tensor:
    """The scale [rows, n_groups, 1] of `qdq_fp8` from the group range ([rows, n_groups]) and the clip
    multiplier, differentiable w.r.t. max_scale."""
    amax = torch.maximum(wmax.abs(), wmin.abs()).float()
    if max_scale is not None:
        amax = amax * max_scale
    return fp8_scale(amax, fmt).unsqueeze(-1)


@dataclass
class Fp8QdqResult:
    """FP8 qdq output. weight/q grouped; scale [rows, n_groups] fp32 (detached)."""

    weight: torch.Tensor  # dequantized W^, differentiable w.r.t. V and max_scale
    scale: torch.Tensor
    q: torch.Tensor  # float8 codes (torch.float8_e4m3fn / float8_e5m2), grouped shape


def qdq_fp8(
    grouped: torch.Tensor,
    *,
    v: Optional[torch.Tensor] = None,
    max_scale: Optional[torch.Tensor] = None,
    wmin: Optional[torch.Tensor] = None,
    wmax: Optional[torch.Tensor] = None,
    fmt: str = "e4m3",
) -> Fp8QdqResult:
    """FP8 qdq of [rows, n_groups, group] (module docstring). v grouped; max_scale / wmin / wmax
    [rows, n_groups] or broadcastable. fp16 / bf16 inputs are computed in fp32."""
    if fmt not in FP8_DTYPES:
        raise ValueError(f"unknown fp8 format {fmt!r}; use one of {sorted(FP8_DTYPES)}")
    x = grouped.float()
    if wmin is None or wmax is None:
        wmin, wmax = group_range(x)  # not detached (see mx_qdq.qdq_mx)
    scale = fp8_group_scale(wmin, wmax, max_scale, fmt)
    y = x / scale
    if v is not None:
        y = y + v
    fmax = FP8_MAX[fmt]
    q = fp8_ste(torch.clamp(y, -fmax, fmax), fmt)
    return Fp8QdqResult(weight=q * scale, scale=scale.detach().squeeze(-1), q=q.detach().to(FP8_DTYPES[fmt]))


def quantize_weight_fp8(weight: torch.Tensor, granularity: Granularity, fmt: str = "e4m3"):
    """RTN FP8 qdq of a [out, in] weight. Returns (W^ [out, in] fp32, Fp8QdqResult, layout)."""
    layout = fp8_layout(weight.shape[0], weight.shape[1], granularity)
    res = qdq_fp8(layout.to_groups(weight.float()), fmt=fmt)
    return layout.from_groups(res.weight), res, layout
