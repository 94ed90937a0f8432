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
from ..quant.opt_rtn import fill_importance, search_sym_clip_factor
from ..schemes import QuantScheme
from .float_tunable import float_layout


@torch.no_grad()
def int_clip_factor(module: nn.Module, scheme: QuantScheme, imatrix: torch.Tensor, *,
                    scale_dtype: torch.dtype = torch.float16, device: str = "cpu") -> torch.Tensor:
    """Sym int opt-RTN: the per-group clip factor f [rows, n_groups] (module docstring) of the layer's weight."""
    weight = layer_weight(module).detach().to(device=device, dtype=torch.float32)
    layout = GroupLayout(weight.shape[0], weight.shape[1], scheme.group_size)
    grouped = layout.to_groups(weight)
    imp = layout.to_groups(imatrix.to(device=device, dtype=torch.float32).expand_as(weight))
    importance = fill_importance(imp, grouped, scheme.bits)
    wmin, wmax = group_range(grouped)
    return search_sym_clip_factor(grouped, scheme.bits, importance, wmin, wmax, scale_dtype)


@torch.no_grad()
def float_init_scale(module: nn.Module, scheme: QuantScheme, imatrix: torch.Tensor, *,
                     gscale: Optional[torch.Tensor] = None, device: str = "cpu") -> torch.Tensor:
    """MX / NVFP4 opt-RTN: the per-group multiplier of the block max [rows, n_groups] with the lowest
    imatrix-weighted error (quant/fp_opt_rtn.py), for FloatTunableLayer's init_scale. NVFP4 layers need the
    block's `gscale` (the one the final qdq uses)."""
    weight = layer_weight(module).detach().to(device=device, dtype=torch.float32)
    layout = float_layout(scheme, *weight.shape)
    grouped = layout.to_groups(weight)
    importance = fill_importance(importance_to_groups(imatrix.to(device), layout), grouped, scheme.bits)
    if scheme.data_type == "nv_fp":
        return search_nvfp4_scale(grouped, importance, gscale=gscale)
    return search_mx_scale(grouped, get_mx_format(scheme.data_type, scheme.bits), importance)
