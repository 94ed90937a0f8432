"""Optimized RTN (the reference's `iters=0` default for sym int below 8 bits): imatrix + scale search.

Per block: run the block on its fp inputs with forward hooks that accumulate, for every quantizable layer,
imatrix_j = sum over tokens of x_j^2 of its input channels; then quantize each layer with the per-group
scale that minimizes the imatrix-weighted error (`quant/opt_rtn.py`). Other schemes (asym, 8 bits) are
rounded to nearest as usual. The block outputs computed before quantization feed the next block (the
reference's RTN does not use quantized inputs).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..layers import layer_weight, set_layer_weight
from ..quant.int_qdq import GroupLayout, group_range, qdq_int
from ..schemes import QuantScheme
from .init_scales import float_init_scale, int_clip_factor  # noqa: F401 (float_init_scale: public here too)
from .input_stats import input_stat_hooks
from .rtn_slices import rtn_in_slices
from .tunable import LayerQuantResult, result_from_qdq
from .gguf import gguf_rtn_block
from .signround import install_act_quantizers, nvfp4_global_scales, rtn_block, with_act_max


def uses_opt_rtn(scheme: QuantScheme) -> bool:
    """Whether opt-RTN changes anything for this scheme: sym int below 8 bits (asym uses plain min/max), and
    every ggml type (llama.cpp's imatrix-weighted search)."""
    if scheme.is_quantized and scheme.gguf is not None:
        return True
    if scheme.is_quantized and scheme.data_type in ("mx_fp", "mx_int", "nv_fp"):
        return True  # MX: shared exponent -1/0/+1; NVFP4: per-16 coefficient 0.50..1.51
    return scheme.is_quantized and scheme.data_type == "int" and scheme.sym and scheme.bits < 8


def imatrix_hooks(layers: dict[str, tuple[nn.Module, QuantScheme]]):
    """While active, accumulate sum of x^2 per input channel (fp32 [in]) of each layer's input."""
    return input_stat_hooks({n: m for n, (m, _) in layers.items()},
                            lambda x: x.reshape(-1, x.shape[-1]).float().pow(2).sum(0), torch.add)


@torch.no_grad()
def opt_rtn_layer(module: nn.Module, scheme: QuantScheme, imatrix: torch.Tensor, *,
                  scale_dtype: torch.dtype = torch.float16, device: str = "cpu") -> LayerQuantResult:
    """Quantize one layer with searched scales; writes the fake-quantized weight in place (in row slices:
    rtn_slices.py)."""
    factor = int_clip_factor(module, scheme, imatrix, scale_dtype=scale_dtype, device=device)

    def quantize(rows: nn.Module, factor_rows: torch.Tensor, _gscale, fixed_range=None) -> LayerQuantResult:
        weight = layer_weight(rows).detach().to(device=device, dtype=torch.float32)
        layout = GroupLayout(weight.shape[0], weight.shape[1], scheme.group_size)
        grouped = layout.to_groups(weight)
        wmin, wmax = group_range(grouped) if fixed_range is None else fixed_range  # (per tensor: the whole weight's)
        res = qdq_int(grouped, scheme.bits, True, alpha=factor_rows, beta=factor_rows, wmin=wmin, wmax=wmax,
                      scale_dtype=scale_dtype)
        set_layer_weight(rows, layout.from_groups(res.weight))
        return result_from_qdq(res, scheme, layout)

    return rtn_in_slices(module, scheme, quantize, init_scale=factor)


def opt_rtn_block(layers: dict[str, tuple[nn.Module, QuantScheme]], imatrix: dict[str, torch.Tensor], *,
                  scale_dtype: torch.dtype = torch.float16, device: str = "cpu",
                  act_max: Optional[dict[str, torch.Tensor]] = None) -> dict[str, LayerQuantResult]:
    """opt-RTN for the layers that use it (and that saw calibration tokens), plain RTN for the rest.
    Activation quantizers (static from `act_max`) are installed on every layer whose scheme has them."""
    searched = {n: l for n, l in layers.items() if uses_opt_rtn(l[1]) and n in imatrix}
    ggml = {n: l for n, l in searched.items() if l[1].gguf is not None}
    floats = {n: l for n, l in searched.items() if l[1].gguf is None and not l[1].is_int}
    results: dict = gguf_rtn_block(ggml, imatrix, device=device) if ggml else {}
    ints = {n: l for n, l in searched.items() if n not in ggml and n not in floats}
    results.update({n: opt_rtn_layer(m, s, imatrix[n], scale_dtype=scale_dtype, device=device)
                    for n, (m, s) in ints.items()})
    quantizers = install_act_quantizers(ints, act_max or {}, tune_clip=False, scale_dtype=scale_dtype)
    for n, q in quantizers.items():
        with_act_max(results[n], q)
    # one set of global scales for the whole block: the search and the final qdq must use the same ones,
    # also for a fused group some of whose members saw no calibration tokens
    gscales = nvfp4_global_scales(layers)
    init_scales = {n: float_init_scale(m, s, imatrix[n], gscale=gscales.get(n), device=device)
                   for n, (m, s) in floats.items()}
    rest = {n: l for n, l in layers.items() if n not in ggml and n not in ints}
    if rest:
        results.update(rtn_block(rest, scale_dtype=scale_dtype, device=device, act_max=act_max,
                                 init_scales=init_scales, gscales=gscales))
    return results
