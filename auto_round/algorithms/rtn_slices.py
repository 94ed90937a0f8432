"""Round-to-nearest of a large layer in row slices, so its temporaries stay bounded.

The tunable state of a layer (TunableLayer / FloatTunableLayer) holds fp32 copies of the grouped weight and V,
and the qdq makes several more weight-sized temporaries: plain RTN of an 11008 x 4096 layer grew the process
by 5-8x its fp32 weight (W4A16 +0.9 GiB, MXFP4 / NVFP4 +1.3 GiB). With V = 0 and fixed clips every group's
result depends only on its own weights (NVFP4 also on the per-tensor global scale, computed beforehand over the
whole weight), so quantizing slices of whole rows gives the same fake-quantized weight, codes and scales.

Sliced: int, MX, NVFP4 and FP8 schemes whose groups lie within one row (group_size > 0 or -1: FP8_STATIC's
per-channel scales), FP8 2-D blocks (FP8_BLOCK's 128 x 128) in slices of whole block rows, and per-tensor int /
FP8 (group_size 0: FPW8A16): their one group's range (min and max, widened to 0) is read from the whole weight
first, in slices, and every slice is quantized with it, so the single scale (and zero point) is the whole
layer's. Not sliced (one call, as before): layers of at most `slice_elements` weights.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from ..layers import layer_weight
from ..quant.fp8_qdq import BlockLayout
from ..quant.int_qdq import GroupLayout
from ..quant.nvfp_qdq import global_scale_from_amax
from ..schemes import QuantScheme
from .float_tunable import FloatQuantResult, float_layout
from .tunable import LayerQuantResult

# weights per slice: 4 MiB per fp32 temporary. An 11008 x 4096 layer, plain RTN, growth of the process W4A16 / MXFP4
# / NVFP4 / MXFP8: whole layer 882 / 1295 / 1343 / 1062 MiB, slices of 4M weights 436 / 174 / 353 / 411, of 1M
# 140 / 111 / 281 / 248 (freed slices are reused; the time did not change, 0.3-0.7 s)
RTN_SLICE_ELEMENTS = 1 << 20

Result = Union[LayerQuantResult, FloatQuantResult]


class _Rows(nn.Module):
    """A weight-only stand-in for some rows of a layer: `weight` [rows, in] is a view into the layer's own
    ([out, in] order, through the transpose for Conv1D), so writing the fake-quantized rows writes the layer."""

    def __init__(self, weight_rows: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight_rows, requires_grad=False)
        self.bias = None


def _layout(scheme: QuantScheme, out_features: int, in_features: int):
    if scheme.is_int:
        return GroupLayout(out_features, in_features, scheme.group_size)
    return float_layout(scheme, out_features, in_features)


def sliceable(scheme: QuantScheme) -> bool:
    """Whether RTN of this scheme may run on row slices (module docstring)."""
    if not scheme.is_quantized or scheme.gguf is not None:
        return False
    if scheme.data_type not in ("int", "mx_fp", "mx_int", "nv_fp", "fp"):
        return False
    if scheme.data_type == "fp" and isinstance(scheme.group_size, (tuple, list)):
        return True  # 2-D blocks: slices of whole block rows (row_slices)
    return isinstance(scheme.group_size, int) and (scheme.group_size != 0 or per_tensor(scheme))


def per_tensor(scheme: QuantScheme) -> bool:
    """One group for the whole weight (group_size 0) of a type whose scale depends only on that group's range."""
    return scheme.group_size == 0 and scheme.data_type in ("int", "fp")


def row_slices(layout: "GroupLayout | BlockLayout", elements: int) -> list[slice]:
    """Slices of whole rows holding about `elements` grouped (padded) weights each: whole block rows for 2-D
    blocks (FP8_BLOCK; the last slice may hold the ragged last block row); one slice when a group spans all
    rows (per tensor: group_size 0; rtn_in_slices slices those itself, with the group's range fixed first)."""
    if isinstance(layout, BlockLayout):
        block_row = layout.block_rows * layout.n_groups * layout.block_cols  # padded weights of one block row
        step = max(1, elements // block_row) * layout.block_rows
        return [slice(start, start + step) for start in range(0, layout.out_features, step)]
    if layout.rows != layout.out_features:
        return [slice(0, layout.out_features)]
    return whole_rows(layout.out_features, layout.padded_in, elements)


def whole_rows(n_rows: int, row_length: int, elements: int) -> list[slice]:
    """Slices of whole rows of about `elements` weights each (at least one row)."""
    step = max(1, elements // max(1, row_length))
    return [slice(start, start + step) for start in range(0, n_rows, step)]


def _weight_slices(module: nn.Module, slice_elements: Optional[int]) -> list[torch.Tensor]:
    weight = layer_weight(module).detach()
    return [weight[rows] for rows in whole_rows(weight.shape[0], weight.shape[1], slice_elements or RTN_SLICE_ELEMENTS)]


def weight_absmax(module: nn.Module, slice_elements: Optional[int] = None) -> torch.Tensor:
    """max |W| of a layer ([] fp32), read in row slices (no weight-sized temporary)."""
    return torch.stack([p.abs().amax().float() for p in _weight_slices(module, slice_elements)]).amax()


def weight_range(module: nn.Module, slice_elements: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min(W) widened to <= 0, max(W) widened to >= 0) of a layer, each [1, 1] fp32 (a per-tensor group's range,
    as group_range gives it), read in row slices."""
    parts = _weight_slices(module, slice_elements)
    wmin = torch.stack([p.amin().float() for p in parts]).amin().clamp(max=0)
    wmax = torch.stack([p.amax().float() for p in parts]).amax().clamp(min=0)
    return wmin.reshape(1, 1), wmax.reshape(1, 1)


def rtn_in_slices(module: nn.Module, scheme: QuantScheme, quantize: Callable[..., Result], *,
                  init_scale: Optional[torch.Tensor] = None, gscale: Optional[torch.Tensor] = None,
                  slice_elements: Optional[int] = None) -> Result:
    """RTN of one layer: `quantize(module_or_rows, init_scale_rows, gscale)` on slices of whole rows, the
    results joined into the whole layer's; one call when the scheme or the layer's size does not need it.

    quantize must write the rows' fake-quantized weight into the module it gets and return its result; for a
    per-tensor scheme the slices are called with `fixed_range=(wmin, wmax)` ([1, 1] each, the whole weight's),
    which quantize must use instead of the slice's own range.
    init_scale: [out, n_groups] per-group multipliers (opt-RTN's), sliced with the rows (per tensor: [1, 1], the
    same for every slice). gscale: NVFP4's global scale; when None it is computed here from the whole weight (a
    slice's own would differ). slice_elements: weights per slice (default RTN_SLICE_ELEMENTS).
    """
    slice_elements = slice_elements or RTN_SLICE_ELEMENTS
    weight = layer_weight(module).detach()
    out_features, in_features = weight.shape
    if scheme.data_type == "nv_fp" and gscale is None:
        gscale = global_scale_from_amax(weight_absmax(module, slice_elements))
    if not sliceable(scheme):
        return quantize(module, init_scale, gscale)
    layout = _layout(scheme, out_features, in_features)
    one_group = per_tensor(scheme)  # whole rows; the one group's range is read from the whole weight
    slices = whole_rows(out_features, in_features, slice_elements) if one_group else row_slices(layout, slice_elements)
    if len(slices) == 1:
        return quantize(module, init_scale, gscale)
    if one_group:
        fixed = weight_range(module, slice_elements)
        parts = [quantize(_Rows(weight[rows]), init_scale, gscale, fixed_range=fixed) for rows in slices]
        return _joined(parts, layout, one_group=True)
    parts = [quantize(_Rows(weight[rows]), None if init_scale is None else init_scale[rows], gscale) for rows in slices]
    return _joined(parts, layout)


def _cat(tensors: list) -> Optional[torch.Tensor]:
    if tensors[0] is None:
        return None
    if tensors[0].dim() == 0:  # a per-scheme constant (e.g. the sym zero point): the same in every slice
        return tensors[0]
    return torch.cat(tensors)


def _joined(parts: list[Result], layout, one_group: bool = False) -> Result:
    """The whole layer's result from its slices' ([out, in] codes stacked; per-group values stacked too, or with
    one_group the one scale / zero point every slice shares)."""
    first = parts[0]
    join = (lambda ts: ts[0]) if one_group else _cat
    if isinstance(first, LayerQuantResult):
        return LayerQuantResult(scheme=first.scheme, layout=layout, scale=join([p.scale for p in parts]),
                                zero_point=join([p.zero_point for p in parts]), codes=_cat([p.codes for p in parts]))
    return FloatQuantResult(scheme=first.scheme, layout=layout, codes=_cat([p.codes for p in parts]),
                            scale=join([p.scale for p in parts]), global_scale=first.global_scale)
