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

# values per chunk: the int64 working copy (and the bit-expanded one for b = 3, 5, 6, 7) of a chunk is all the
# temporary memory; a whole 152064 x 2048 lm_head at once took ~5 GB of int64 temporaries to pack
_CHUNK_VALUES = 1 << 20


def _row_chunks(rows: int, length: int):
    step = max(1, _CHUNK_VALUES // max(1, length))
    return ((start, min(rows, start + step)) for start in range(0, rows, step))


def _check(length: int, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if (length * bits) % 32:
        raise ValueError(f"cannot pack {length} values of {bits} bits into whole int32 words")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> int32 with the same bits."""
    return (words - ((words >> 31) & 1) * (1 << 32)).to(torch.int32)


def pack_last_dim(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [..., L] integers in [0, 2^bits) into int32 [..., L*bits/32] (rows in chunks of ~1M values)."""
    length = values.shape[-1]
    _check(length, bits)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(values.min())}, {int(values.max())}]")
    lead = values.shape[:-1]
    rows = values.reshape(-1, length)
    out = torch.empty((rows.shape[0], length * bits // 32), dtype=torch.int32, device=values.device)
    for start, stop in _row_chunks(rows.shape[0], length):
        out[start:stop] = _to_int32(_pack_rows(rows[start:stop].to(torch.int64), bits))
    return out.reshape(*lead, length * bits // 32)


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 [rows, L] -> int64 words [rows, L*bits/32] holding uint32 bit patterns."""
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int64, device=v.device) * bits
        return (v.reshape(v.shape[0], -1, per_word) << shifts).sum(dim=-1)
    bit_idx = torch.arange(bits, dtype=torch.int64, device=v.device)
    word_shift = torch.arange(32, dtype=torch.int64, device=v.device)
    stream = ((v.unsqueeze(-1) >> bit_idx) & 1).reshape(v.shape[0], -1, 32)
    return (stream << word_shift).sum(dim=-1)


def unpack_last_dim(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of pack_last_dim: int32 [..., length*bits/32] -> int32 [..., length] (rows in chunks)."""
    _check(length, bits)
    if words.shape[-1] != length * bits // 32:
        raise ValueError(f"expected {length * bits // 32} words for {length} values of {bits} bits, got {words.shape[-1]}")
    lead = words.shape[:-1]
    rows = words.reshape(-1, words.shape[-1])
    out = torch.empty((rows.shape[0], length), dtype=torch.int32, device=words.device)
    for start, stop in _row_chunks(rows.shape[0], length):
        out[start:stop] = _unpack_rows(rows[start:stop].to(torch.int64) & 0xFFFFFFFF, bits, length)
    return out.reshape(*lead, length)


def _unpack_rows(w: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int64 words [rows, length*bits/32] (uint32 patterns) -> int64 values [rows, length]."""
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = torch.arange(32 // bits, dtype=torch.int64, device=w.device) * bits
        return ((w.unsqueeze(-1) >> shifts) & mask).reshape(w.shape[0], length)
    word_shift = torch.arange(32, dtype=torch.int64, device=w.device)
    weights = 1 << torch.arange(bits, dtype=torch.int64, device=w.device)
    stream = ((w.unsqueeze(-1) >> word_shift) & 1).reshape(w.shape[0], length, bits)
    return (stream * weights).sum(dim=-1)
