"""ggml (GGUF) quantization math: llama.cpp's scale searches and double quant, as pure tensor functions.

    params = search_params(W, "q4_k", imatrix=None, v=None)   # llama.cpp's algorithm for the type
    W_hat, codes = qdq(W, params, v)                          # bit-exact with gguf-py's dequantizer
    W_hat, codes, params = quantize(W, "q4_k")

Byte packing lives in auto_round.packing.gguf.
"""

from .api import qdq, quantize, search_params
from .search import make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants
from .types import GGML_TYPES, QK_K, GGMLType, GGUFParams, build_params, ggml_type, round_fp16

__all__ = [
    "GGML_TYPES",
    "QK_K",
    "GGMLType",
    "GGUFParams",
    "build_params",
    "ggml_type",
    "make_q3_quants",
    "make_qkx_quants",
    "make_qp_quants",
    "make_qx_quants",
    "qdq",
    "quantize",
    "round_fp16",
    "search_params",
]
