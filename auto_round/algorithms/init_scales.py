"""Per-layer imatrix-weighted scale searches (opt-RTN's), returning the chosen per-group multipliers.

Used by opt-RTN (iters=0), which rounds with them, and by SignRound's `enable_alg_ext`, which starts tuning
from them (`alg_ext.py`). Both take the layer's imatrix [in] (sum over calibration tokens of x_j^2 of input
channel j) and return a [rows, n_groups] fp32 multiplier of the group max (quant/opt_rtn.py,
quant/fp_opt_rtn.py):
    sym int: f = 2^(b-1) / d*, so the sym qdq with alpha = beta = f gives the searched scale m / d*;
    MX:      c in {0.5, 1, 2};   NVFP4: c in 0.50 .. 1.51 (the qdq's `init_scale`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..layers import layer_weight
from ..quant.fp_opt_rtn import importance_to_groups, search_mx_scale, search_nvfp4_scale
from ..quant.int_qdq import GroupLayout, group_range
from ..quant.mx_qdq import get_mx_format
from ..quant.nvfp_qdq import global_scale_from_amax
from ..quant.opt_rtn import SEARCH_SLICE_ELEMENTS, fill_importance, search_sym_clip_factor
from ..schemes import QuantScheme
from .float_tunable import float_layout
from .rtn_slices import row_slices, weight_absmax


# Rows per slice of a layer's search hold about this many weights: the weight copy, its importance (the imatrix
# broadcast over rows) and the searches' temporaries then cost a few MiB whatever the layer's size (a whole
# 11008 x 4096 layer used to grow the process by 0.9-1.4 GiB, 5-8x its fp32 weight). Results do not depend on
# it: every group is searched on its own, and the row statistics (fill_importance's rms) see whole rows.
INT_SLICE_ELEMENTS = SEARCH_SLICE_ELEMENTS
FLOAT_SLICE_ELEMENTS = 1 << 20


@torch.no_grad()
def int_clip_factor(module: nn.Module, scheme: QuantScheme, imatrix: torch.Tensor, *,
                    scale_dtype: torch.dtype = torch.float16, device: str = "cpu") -> torch.Tensor:
    """Sym int opt-RTN: the per-group clip factor f [rows, n_groups] (module docstring) of the layer's weight."""
    weight = layer_weight(module).detach()
    imatrix = imatrix.to(device=device, dtype=torch.float32)
    parts = []
    for rows in row_slices(GroupLayout(*weight.shape, scheme.group_size), INT_SLICE_ELEMENTS):
        part = weight[rows].to(device=device, dtype=torch.float32)
        layout = GroupLayout(part.shape[0], part.shape[1], scheme.group_size)
        grouped = layout.to_groups(part)
        importance = fill_importance(layout.to_groups(imatrix.expand_as(part)), grouped, scheme.bits)
        wmin, wmax = group_range(grouped)
        parts.append(search_sym_clip_factor(grouped, scheme.bits, importance, wmin, wmax, scale_dtype))
    return torch.cat(parts)


@torch.no_grad()
def float_init_scale(module: nn.Module, scheme: QuantScheme, imatrix: torch.Tensor, *,
                     gscale: Optional[torch.Tensor] = None, device: str = "cpu") -> torch.Tensor:
    """MX / NVFP4 opt-RTN: the per-group multiplier of the block max [rows, n_groups] with the lowest
    imatrix-weighted error (quant/fp_opt_rtn.py), for FloatTunableLayer's init_scale. NVFP4 layers need the
    block's `gscale` (the one the final qdq uses); without one, the layer's own (from the whole weight)."""
    weight = layer_weight(module).detach()
    imatrix = imatrix.to(device)
    if scheme.data_type == "nv_fp" and gscale is None:  # the layer's own: 448 * 6 / amax of the whole weight
        gscale = global_scale_from_amax(weight_absmax(module, FLOAT_SLICE_ELEMENTS).to(device))
    parts = []
    for rows in row_slices(float_layout(scheme, *weight.shape), FLOAT_SLICE_ELEMENTS):
        part = weight[rows].to(device=device, dtype=torch.float32)
        layout = float_layout(scheme, *part.shape)
        grouped = layout.to_groups(part)
        importance = fill_importance(importance_to_groups(imatrix, layout), grouped, scheme.bits)
        if scheme.data_type == "nv_fp":
            parts.append(search_nvfp4_scale(grouped, importance, gscale=gscale))
        else:
            parts.append(search_mx_scale(grouped, get_mx_format(scheme.data_type, scheme.bits), importance))
    return torch.cat(parts)
