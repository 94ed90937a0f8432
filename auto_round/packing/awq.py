"""AWQ GEMM layout (auto_awq / auto_round:auto_awq), 4-bit.

    qweight int32 [in, out*b/32]       codes packed along out_features
    qzeros  int32 [n_groups, out*b/32] raw zero points packed along out_features
    scales  fp16  [n_groups, out]
Within every run of 8 outputs the nibbles are interleaved: nibble k of a word holds output
AWQ_ORDER[k] = [0, 2, 4, 6, 1, 3, 5, 7][k] of that run. Requires in % group_size == 0.
"""

from __future__ import annotations

import torch

from .bitstream import pack_last_dim, unpack_last_dim

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_INVERSE = tuple(AWQ_ORDER.index(i) for i in range(8))


def _interleave(x: torch.Tensor) -> torch.Tensor:
    """[..., out] -> [..., out] with each run of 8 reordered so position k holds element AWQ_ORDER[k]."""
    lead, out = x.shape[:-1], x.shape[-1]
    if out % 8:
        raise ValueError(f"AWQ packing needs out_features divisible by 8, got {out}")
    runs = x.reshape(*lead, out // 8, 8)
    return runs[..., list(AWQ_ORDER)].reshape(*lead, out)


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    lead, out = x.shape[:-1], x.shape[-1]
    runs = x.reshape(*lead, out // 8, 8)
    return runs[..., list(_INVERSE)].reshape(*lead, out)


def pack_awq_qweight(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Codes [out, in] -> qweight int32 [in, out*bits/32]."""
    _check_bits(bits)
    return pack_last_dim(_interleave(codes.t()), bits)


def unpack_awq_qweight(qweight: torch.Tensor, out_features: int, bits: int = 4) -> torch.Tensor:
    """qweight int32 [in, out*bits/32] -> codes int32 [out, in]."""
    _check_bits(bits)
    return _deinterleave(unpack_last_dim(qweight, bits, out_features)).t().contiguous()


def pack_awq_qzeros(zeros: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Zero points [n_groups, out] -> qzeros int32 [n_groups, out*bits/32] (raw, no offset)."""
    _check_bits(bits)
    return pack_last_dim(_interleave(zeros), bits)


def unpack_awq_qzeros(qzeros: torch.Tensor, out_features: int, bits: int = 4) -> torch.Tensor:
    _check_bits(bits)
    return _deinterleave(unpack_last_dim(qzeros, bits, out_features))


def _check_bits(bits: int) -> None:
    if bits != 4:
        raise ValueError(f"the AWQ GEMM layout holds 4-bit weights only, got {bits} bits")
