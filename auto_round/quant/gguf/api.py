"""search_params / qdq / quantize: the public entry points of the ggml quantization math.

qdq reproduces gguf-py's dequantizer operation for operation (one float32 multiply, then one
subtraction for asym types), so W^ equals gguf.quants.dequantize(pack_gguf(codes, params)) bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kquant import search_kquant
from .legacy import search_legacy
from .types import GGUFParams, check_weight_shape, ggml_type

# search_params works on row chunks of about this many elements (peak memory ~16 float32 copies of a chunk)
_CHUNK_ELEMENTS = 1 << 21


def _check_extra(name: str, t, shape, imatrix: Optional[torch.Tensor], v: Optional[torch.Tensor]) -> None:
    if imatrix is not None:
        if tuple(imatrix.shape) != (shape[1],):
            raise ValueError(
                f"{t.name}: imatrix must have shape ({shape[1]},) for {name} {tuple(shape)}; got {tuple(imatrix.shape)}"
            )
        if not bool(torch.isfinite(imatrix).all()) or bool((imatrix < 0).any()):
            raise ValueError(f"{t.name}: imatrix must be finite and >= 0")
    if v is not None and tuple(v.shape) != tuple(shape):
        raise ValueError(f"{t.name}: v must have the weight's shape {tuple(shape)}; got {tuple(v.shape)}")


def search_params(
    weight: torch.Tensor,
    qtype: str,
    imatrix: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
) -> GGUFParams:
    """Quantization parameters of weight [out, in] for ggml type `qtype`.

    imatrix None: llama.cpp's quantize_row_<t>_ref (llama-quantize without an imatrix).
    imatrix [in] (mean squared activation per input channel, >= 0): quantize_row_<t>_impl's weighted search.
    v (like weight, in [-0.5, 0.5]): rounding offset added before every element rounding in the search.
    """
    t = ggml_type(qtype)
    check_weight_shape(t, tuple(weight.shape))
    _check_extra("weight", t, weight.shape, imatrix, v)
    with torch.no_grad():
        w = weight.detach().to(torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{t.name}: weight {tuple(weight.shape)} holds inf or NaN")
        qw = None if imatrix is None else imatrix.detach().to(device=w.device, dtype=torch.float32)
        vv = None if v is None else v.detach().to(device=w.device, dtype=torch.float32)
        search = search_kquant if t.kquant else search_legacy
        # rows are independent: search bounded row chunks so temporaries stay ~(16 x chunk) floats
        step = max(1, _CHUNK_ELEMENTS // w.shape[1])
        if step >= w.shape[0]:
            return search(w, t, qw, vv)
        parts = [
            search(w[i : i + step], t, qw, None if vv is None else vv[i : i + step])
            for i in range(0, w.shape[0], step)
        ]
        return _concat_rows(parts)


def _concat_rows(parts: list[GGUFParams]) -> GGUFParams:
    def cat(field):
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else torch.cat(values, dim=0)

    return GGUFParams(qtype=parts[0].qtype, **{f: cat(f) for f in ("scale", "offset", "d", "dmin", "sc", "m")})


def qdq(
    weight: torch.Tensor, params: GGUFParams, v: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W^ float32 [out, in], codes int32 [out, in]) of weight with frozen params.

    q = clamp(round(x / scale + v), qmin, qmax), x = W (sym) or W + offset (asym); round is a
    straight-through estimator (torch.round forward, identity gradient), so W^ is differentiable in v
    (and in W). A sub-block with scale 0 gets q = 0. W^ = scale * q (sym) or scale * q - offset (asym).
    Codes are unsigned, q + zero, as ggml stores them (q4_0 0..15, q5_0 0..31, q3_k 0..7, q6_k 0..63),
    so every type fits uint8; q8_0's code is q + 128 (ggml stores the int8 q = code - 128).
    """
    t = ggml_type(params.qtype)
    out_f, in_f = check_weight_shape(t, tuple(weight.shape))
    _check_extra("weight", t, weight.shape, None, v)
    n_sub = in_f // t.sub
    if tuple(params.scale.shape) != (out_f, n_sub):
        raise ValueError(
            f"{t.name}: params.scale has shape {tuple(params.scale.shape)}, "
            f"weight {tuple(weight.shape)} needs {(out_f, n_sub)}"
        )
    x = weight.to(torch.float32).reshape(out_f, n_sub, t.sub)  # (out, sub-blocks, sub)
    scale = params.scale.to(x.device).unsqueeze(-1)
    offset = None if t.sym else params.offset.to(x.device).unsqueeze(-1)
    live = scale != 0
    y = (x if offset is None else x + offset) / torch.where(live, scale, torch.ones_like(scale))
    if v is not None:
        y = y + v.to(torch.float32).reshape(x.shape)
    y = torch.where(live, y, torch.zeros_like(y))
    # round half to even forward, identity backward; the forward value is exactly round(y) (+0.0)
    q = (torch.round(y).detach() + (y - y.detach())).clamp(t.qmin, t.qmax)
    w_hat = scale * q if offset is None else scale * q - offset
    codes = q.detach().to(torch.int32) + t.zero
    return w_hat.reshape(out_f, in_f), codes.reshape(out_f, in_f)


def quantize(
    weight: torch.Tensor, qtype: str, imatrix: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, GGUFParams]:
    """search_params + qdq: (W^ [out, in], codes [out, in], params)."""
    params = search_params(weight, qtype, imatrix)
    with torch.no_grad():
        w_hat, codes = qdq(weight, params)
    return w_hat, codes, params
