"""Little-endian bit-stream packing of small unsigned integers into int32 words.

Along the packed dimension, value k occupies stream bits [k*b, (k+1)*b), lowest bit first, and word w
holds stream bits [32*w, 32*w + 32). For b in {2, 4, 8} this is the usual "32/b values per word,
first value in the lowest bits" layout; for b = 3 it is the classic GPTQ 32-values-in-3-words layout
(value 10 straddles words 0 and 1); for b in {5, 6, 7} it is the generic stream over blocks of 32.

    word 0 (b = 4):  bits 31..28 | ... | 7..4 | 3..0
                       v7        | ... |  v1  |  v0
"""

from __future__ import annotations

import torch

_CHUNK_ROWS = 256  # rows per chunk on the generic path, bounds the bit-expanded temporary


def _check(length: int, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if (length * bits) % 32:
        raise ValueError(f"cannot pack {length} values of {bits} bits into whole int32 words")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> int32 with the same bits."""
    return (words - ((words >> 31) & 1) * (1 << 32)).to(torch.int32)


def pack_last_dim(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [..., L] integers in [0, 2^bits) into int32 [..., L*bits/32]."""
    length = values.shape[-1]
    _check(length, bits)
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(v.min())}, {int(v.max())}]")
    lead = v.shape[:-1]
    v = v.reshape(-1, length)
    if 32 % bits == 0:
        per_word = 32 // bits
        v = v.reshape(v.shape[0], -1, per_word)
        shifts = torch.arange(per_word, dtype=torch.int64) * bits
        words = (v << shifts).sum(dim=-1)
    else:
        chunks = []
        bit_idx = torch.arange(bits, dtype=torch.int64)
        word_shift = torch.arange(32, dtype=torch.int64)
        for start in range(0, v.shape[0], _CHUNK_ROWS):
            part = v[start : start + _CHUNK_ROWS]
            stream = ((part.unsqueeze(-1) >> bit_idx) & 1).reshape(part.shape[0], -1, 32)
            chunks.append((stream << word_shift).sum(dim=-1))
        words = torch.cat(chunks) if chunks else v.new_zeros((0, length * bits // 32))
    return _to_int32(words).reshape(*lead, length * bits // 32)


def unpack_last_dim(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of pack_last_dim: int32 [..., length*bits/32] -> int32 [..., length]."""
    _check(length, bits)
    if words.shape[-1] != length * bits // 32:
        raise ValueError(f"expected {length * bits // 32} words for {length} values of {bits} bits, got {words.shape[-1]}")
    w = words.to(torch.int64) & 0xFFFFFFFF
    lead = w.shape[:-1]
    w = w.reshape(-1, w.shape[-1])
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int64) * bits
        vals = ((w.unsqueeze(-1) >> shifts) & mask).reshape(w.shape[0], length)
    else:
        chunks = []
        word_shift = torch.arange(32, dtype=torch.int64)
        weights = 1 << torch.arange(bits, dtype=torch.int64)
        for start in range(0, w.shape[0], _CHUNK_ROWS):
            part = w[start : start + _CHUNK_ROWS]
            stream = ((part.unsqueeze(-1) >> word_shift) & 1).reshape(part.shape[0], length, bits)
            chunks.append((stream * weights).sum(dim=-1))
        vals = torch.cat(chunks) if chunks else w.new_zeros((0, length))
    return vals.to(torch.int32).reshape(*lead, length)
