"""Exact round trips of every packed layout, plus hand-checked bit positions."""

import pytest
import torch

from auto_round.packing import pack_last_dim, pack_qweight, pack_qzeros, unpack_last_dim, unpack_qweight, unpack_qzeros
from auto_round.packing.awq import pack_awq_qweight, pack_awq_qzeros, unpack_awq_qweight, unpack_awq_qzeros


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(1, 32), (3, 64), (64, 576), (96, 1536), (5, 96)])
def test_bitstream_round_trip(bits, shape):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, shape, generator=gen)
    words = pack_last_dim(values, bits)
    assert words.dtype == torch.int32 and words.shape == (shape[0], shape[1] * bits // 32)
    assert torch.equal(unpack_last_dim(words, bits, shape[1]), values.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_extreme_values_round_trip(bits):
    values = torch.tensor([[0, 2**bits - 1] * 16, [2**bits - 1] * 32])
    assert torch.equal(unpack_last_dim(pack_last_dim(values, bits), bits, 32), values.int())


def test_bit_positions_by_hand():
    v = torch.zeros(1, 8, dtype=torch.int64)
    v[0, 1] = 0xA  # 4-bit: value 1 sits in bits 4..7
    assert pack_last_dim(v, 4)[0, 0].item() == 0xA0
    v3 = torch.zeros(1, 32, dtype=torch.int64)
    v3[0, 10] = 0b101  # 3-bit: value 10 spans bits 30..32 -> word0 bits 30,31 = 01, word1 bit 0 = 1
    words = pack_last_dim(v3, 3)
    assert (words[0, 0].item() & 0xFFFFFFFF) == (0b01 << 30) and words[0, 1].item() == 1
    v8 = torch.tensor([[0xFF, 0, 0, 0x80]])
    assert (pack_last_dim(v8, 8)[0, 0].item() & 0xFFFFFFFF) == 0x800000FF


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_qweight_qzeros_shapes_and_round_trip(bits):
    out_f, in_f, groups = 64, 192, 3
    codes = torch.randint(0, 2**bits, (out_f, in_f))
    qweight = pack_qweight(codes, bits)
    assert qweight.shape == (in_f * bits // 32, out_f) and qweight.dtype == torch.int32
    assert torch.equal(unpack_qweight(qweight, bits, in_f), codes.int())
    zeros = torch.randint(1, 2**bits, (groups, out_f))
    qzeros = pack_qzeros(zeros, bits, zero_offset=1)
    assert qzeros.shape == (groups, out_f * bits // 32)
    assert torch.equal(unpack_qzeros(qzeros, bits, out_f, zero_offset=1), zeros.int())
    # GPTQ v1 stores zp - 1: for 4-bit sym (zp 8) every nibble is 7
    if bits == 4:
        sym = pack_qzeros(torch.full((1, 8), 8), 4, zero_offset=1)
        assert (sym[0, 0].item() & 0xFFFFFFFF) == 0x77777777


def test_awq_round_trip_and_interleave():
    codes = torch.randint(0, 16, (64, 128))
    assert torch.equal(unpack_awq_qweight(pack_awq_qweight(codes), 64), codes.int())
    zeros = torch.randint(0, 16, (2, 64))
    assert torch.equal(unpack_awq_qzeros(pack_awq_qzeros(zeros), 64), zeros.int())
    one = torch.zeros(8, 1, dtype=torch.int64)
    one[1, 0] = 3  # output 1 sits in nibble 4 (order 0,2,4,6,1,3,5,7)
    assert pack_awq_qweight(one)[0, 0].item() == 3 << 16


def test_out_of_range_values_are_rejected():
    with pytest.raises(ValueError, match="out of range"):
        pack_last_dim(torch.tensor([[16] + [0] * 7]), 4)
    with pytest.raises(ValueError, match="whole int32 words"):
        pack_last_dim(torch.zeros(1, 10, dtype=torch.int64), 3)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_in_row_chunks_equals_one_chunk(monkeypatch, bits):
    """Rows are packed / unpacked in chunks of ~_CHUNK_VALUES values (bounded int64 temporaries): any chunking,
    one row or several with a short last chunk, gives the words of a single chunk."""
    import auto_round.packing.bitstream as bitstream

    torch.manual_seed(bits)
    values = torch.randint(0, 2**bits, (3, 7, 64), dtype=torch.uint8)
    monkeypatch.setattr(bitstream, "_CHUNK_VALUES", 1 << 30)
    whole = pack_last_dim(values, bits)
    for chunk in (1, 150):  # one row a chunk; two rows (the last chunk of 21 rows has one)
        monkeypatch.setattr(bitstream, "_CHUNK_VALUES", chunk)
        words = pack_last_dim(values, bits)
        assert words.dtype == torch.int32 and torch.equal(words, whole)
        assert torch.equal(unpack_last_dim(words, bits, 64), values.to(torch.int32))
