"""GPTQ-style tensors as auto_round / auto_gptq checkpoints store them.

    qweight int32 [in*b/32, out]      codes packed along in_features (bit stream, see bitstream.py)
    qzeros  int32 [n_groups, out*b/32] zero points packed along out_features
    scales  fp16  [n_groups, out]

Codes q are unsigned in [0, 2^b - 1]; the weight is W[o, i] = scales[g, o] * (q[o, i] - z[g, o]) with
g = i // group_size. In the "auto_gptq" convention (GPTQ v1) qzeros holds z - 1; in the plain
"auto_round" convention it holds z. The offset is applied by the caller (`zero_offset`).
"""

from __future__ import annotations

import torch

from .bitstream import pack_last_dim, unpack_last_dim


def pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [out, in] -> qweight int32 [in*bits/32, out]."""
    return pack_last_dim(q, bits).t().contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 [in*bits/32, out] -> codes int32 [out, in]."""
    return unpack_last_dim(qweight.t(), bits, in_features)


def pack_qzeros(zeros: torch.Tensor, bits: int, zero_offset: int = 0) -> torch.Tensor:
    """Zero points [n_groups, out] -> qzeros int32 [n_groups, out*bits/32], storing (z - zero_offset).

    zero_offset=1 is the GPTQ v1 convention; (z - 1) is taken modulo 2^bits, as GPTQ kernels do.
    """
    stored = (zeros.to(torch.int64) - zero_offset) % (2**bits)
    return pack_last_dim(stored, bits)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, zero_offset: int = 0) -> torch.Tensor:
    """qzeros -> zero points int32 [n_groups, out], adding back zero_offset."""
    return unpack_last_dim(qzeros, bits, out_features) + zero_offset


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    zero_offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild the float weight [out, in] from GPTQ tensors (group_size -1 means one group of `in`)."""
    out_features = scales.shape[1]
    q = unpack_qweight(qweight, bits, in_features)
    z = unpack_qzeros(qzeros, bits, out_features, zero_offset)
    g = in_features if group_size <= 0 else group_size
    gidx = torch.arange(in_features) // g
    s = scales.to(dtype)[gidx].t()  # [out, in]
    zz = z[gidx].t().to(dtype)
    return s * (q.to(dtype) - zz)
