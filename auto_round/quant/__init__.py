"""Pure quantization math (no model, I/O, environment or logging)."""

from .int_qdq import GroupLayout, QdqResult, group_range, qdq_int, qdq_int_asym, qdq_int_sym, quantize_weight_rtn, round_ste

__all__ = ["GroupLayout", "QdqResult", "group_range", "qdq_int", "qdq_int_asym", "qdq_int_sym", "quantize_weight_rtn", "round_ste"]
