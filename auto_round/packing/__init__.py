"""Bit layouts of packed integer weights; pure tensor functions with exact round trips."""

from .bitstream import pack_last_dim, unpack_last_dim
from .gptq import dequantize_gptq, pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros

__all__ = [
    "pack_last_dim",
    "unpack_last_dim",
    "pack_qweight",
    "unpack_qweight",
    "pack_qzeros",
    "unpack_qzeros",
    "dequantize_gptq",
]
