"""QuantLinear: a Linear layer holding packed integer weights, for any device torch runs on (the "torch" backend).

Buffers, exactly as the checkpoint stores them so transformers' loader fills them in place
(n_groups = ceil(in / group_size), the last group may be ragged; group_size -1 means one group of `in`):

    layout "gptq" (auto_round, auto_round:auto_gptq, auto_round:gptqmodel)
        qweight int32 [in*b/32, out]        codes packed along in_features
    layout "awq" (auto_round:auto_awq, 4-bit)
        qweight int32 [in, out*b/32]        codes packed along out_features, AWQ nibble order
    both
        qzeros  int32 [n_groups, out*b/32]  stored zero point = z - zero_offset
        scales  fp16  [n_groups, out]       (fp32 / bf16 when the checkpoint says so); may be negative
        bias    dtype [out]                 optional
        g_idx   int32 [in]                  optional (GPTQ checkpoints), group of each input channel

    W[o, i] = scales[g, o] * (q[o, i] - z[g, o]),  g = g_idx[i] or i // group_size

`post_init` prepares the forward once the buffers are filled. On CPU, bf16 4-bit layers with group 32/64/128/256
are repacked for torch's int4 kernel (`int4_cpu.py`: 4x less weight traffic than bf16, which is what decoding is
bound by); every other layer (fp32 models included: that path is exact) unpacks once into a float weight
[out, in] in the compute dtype (non-persistent buffer `weight`), so a forward is one F.linear. The packed buffers stay for `save_pretrained`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..packing.awq import unpack_awq_qweight, unpack_awq_qzeros
from ..packing.gptq import unpack_qweight, unpack_qzeros
from .int4_cpu import Int4Weight, int4_linear, int4_problem, pack_int4

LAYOUTS = ("gptq", "awq")
_CHUNK = 2048  # output (gptq) or input (awq) channels unpacked at a time: bounds int64 temporaries of big layers


def packing_problem(in_features: int, out_features: int, bits: int, group_size: int, layout: str = "gptq") -> Optional[str]:
    """Why a layer of this shape cannot be held in `layout`, or None when it can."""
    if not 2 <= bits <= 8:
        return f"bits={bits} is not in 2..8"
    if layout == "gptq":
        if (in_features * bits) % 32 or (out_features * bits) % 32:
            return f"in_features*bits and out_features*bits must be multiples of 32 (in={in_features}, out={out_features})"
        return None
    if layout == "awq":
        group = in_features if group_size <= 0 else group_size
        if bits != 4:
            return f"the AWQ layout holds 4-bit weights only, got {bits}"
        if out_features % 8 or in_features % group:
            return f"AWQ needs out_features % 8 == 0 and in_features % group_size == 0 (in={in_features}, out={out_features}, group={group})"
        return None
    return f"unknown layout {layout!r}; expected one of {LAYOUTS}"


def _clear_cache_after_load(module: "QuantLinear", _incompatible_keys) -> None:
    module.clear_cache()


class QuantLinear(nn.Module):
    """Packed integer Linear (see module docstring for buffers and formula).

    Args:
        in_features, out_features: the float layer's shape (weight [out, in]).
        bits: 2..8. group_size: > 0, or -1 for per output channel.
        zero_offset: added to the stored zero points: 1 for GPTQ v1 ("auto_round:auto_gptq"), 0 otherwise.
        bias: whether a bias [out] is stored.
        dtype: compute dtype of the cached weight, the bias and the matmul (default: torch's default dtype).
        layout: "gptq" or "awq". scale_dtype: dtype of `scales` in the checkpoint.
        g_idx: register a g_idx [in] buffer (GPTQ checkpoints store one). device: where to allocate the buffers.
        pad_in_to_group: qweight holds in_features rounded up to whole groups (the reference's model-free RTN
            writes ragged layers that way); the padding codes are dropped when unpacking.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        zero_offset: int = 0,
        bias: bool = False,
        dtype: Optional[torch.dtype] = None,
        *,
        layout: str = "gptq",
        scale_dtype: torch.dtype = torch.float16,
        g_idx: bool = False,
        device: "torch.device | str | None" = None,
        pad_in_to_group: bool = False,
    ) -> None:
        super().__init__()
        problem = packing_problem(in_features, out_features, bits, group_size, layout)
        if problem:
            raise ValueError(f"QuantLinear({in_features} -> {out_features}, {bits}-bit): {problem}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = -1 if group_size <= 0 else group_size
        self.zero_offset, self.layout = zero_offset, layout
        self.dtype = dtype or torch.get_default_dtype()
        group = in_features if self.group_size == -1 else self.group_size
        n_groups = -(-in_features // group)
        packed_out = out_features * bits // 32
        self.packed_in = n_groups * group if pad_in_to_group and layout == "gptq" else in_features
        qweight_shape = (self.packed_in * bits // 32, out_features) if layout == "gptq" else (in_features, packed_out)
        self.register_buffer("qweight", torch.zeros(qweight_shape, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_out, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=scale_dtype, device=device))
        if g_idx:
            self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32, device=device) // group)
        else:
            self.g_idx = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=self.dtype, device=device))
        else:
            self.bias = None
        # The dequantized weight [out, in], empty until post_init. A non-persistent buffer: never saved nor expected in a
        # checkpoint, moves with .to(). Never None: model init code (e.g. GPT-2's _init_weights) touches `.weight`.
        self.register_buffer("weight", self._placeholder(device), persistent=False)
        self._cache_weight = True  # False for offloaded layers, whose buffers live elsewhere between forwards
        self._int4: Optional[Int4Weight] = None  # set by post_init when the int4 CPU kernel serves this layer
        # Loading new packed tensors makes the cached weight stale (a module-level function keeps the layer picklable).
        self.register_load_state_dict_post_hook(_clear_cache_after_load)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, layout={self.layout}, zero_offset={self.zero_offset}, "
                f"bias={self.bias is not None}, dtype={self.dtype}")

    # ------------------------------------------------------------------ unpacking

    def zeros(self) -> torch.Tensor:
        """Zero points int32 [n_groups, out] (offset added back)."""
        if self.layout == "gptq":
            return unpack_qzeros(self.qzeros, self.bits, self.out_features, self.zero_offset)
        return unpack_awq_qzeros(self.qzeros, self.out_features, self.bits) + self.zero_offset

    def codes(self) -> torch.Tensor:
        """Integer codes int32 [out, in]."""
        if self.layout == "gptq":
            return unpack_qweight(self.qweight, self.bits, self.packed_in)[:, : self.in_features]
        return unpack_awq_qweight(self.qweight, self.out_features, self.bits)

    def _group_index(self) -> torch.Tensor:
        """Group of each input channel, int64 [in]."""
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        group = self.in_features if self.group_size == -1 else self.group_size
        return torch.arange(self.in_features, device=self.qweight.device) // group

    @torch.no_grad()
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Float weight [out, in] in `dtype` (default self.dtype).

        Computed in fp32 and rounded once: fp16 scales times integers |q - z| < 256 are exact in fp32, so an fp32
        result equals the fake-quant weight bit for bit and a bf16/fp16 result is correctly rounded.
        """
        dtype = dtype or self.dtype
        gidx = self._group_index()  # [in]
        zg = self.zeros().to(torch.float32)  # [n_groups, out]
        sg = self.scales.to(torch.float32)  # [n_groups, out]
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.qweight.device)
        if self.layout == "gptq":
            for o0 in range(0, self.out_features, _CHUNK):
                o1 = min(o0 + _CHUNK, self.out_features)
                q = unpack_qweight(self.qweight[:, o0:o1], self.bits, self.packed_in)[:, : self.in_features].to(torch.float32)
                s, z = sg[:, o0:o1][gidx].t(), zg[:, o0:o1][gidx].t()  # [o1-o0, in]
                out[o0:o1] = (s * (q - z)).to(dtype)
        else:
            for i0 in range(0, self.in_features, _CHUNK):
                i1 = min(i0 + _CHUNK, self.in_features)
                q = unpack_awq_qweight(self.qweight[i0:i1], self.out_features, self.bits).to(torch.float32)
                s, z = sg[gidx[i0:i1]].t(), zg[gidx[i0:i1]].t()  # [out, i1-i0]
                out[:, i0:i1] = (s * (q - z)).to(dtype)
        return out

    # ------------------------------------------------------------------ life cycle

    def _placeholder(self, device: "torch.device | str | None" = None) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype, device=device)

    def clear_cache(self) -> None:
        self.weight = self._placeholder(self.qweight.device)
        self._int4 = None

    @property
    def kernel(self) -> str:
        """"int4_cpu" (torch's packed int4 matmul) or "dequant" (float weight, cached or rebuilt per forward)."""
        return "int4_cpu" if self._int4 is not None else "dequant"

    def _int4_problem(self) -> Optional[str]:
        if self.qweight.device.type != "cpu":
            return f"device {self.qweight.device}"
        permuted = self.g_idx is not None and not torch.equal(
            self.g_idx.to(torch.int64), torch.arange(self.in_features) // max(self.group_size, 1))
        return int4_problem(self.bits, self.group_size, self.in_features, self.out_features, permuted, self.dtype)

    def post_init(self, cache: bool = True, use_int4_kernel: bool = True) -> None:
        """Call after the packed buffers are filled: prepares the int4 kernel or caches the dequantized weight.

        cache=False (offloaded layers) dequantizes on every forward instead. use_int4_kernel=False forces the
        float path (for comparisons).
        """
        self._cache_weight = cache
        self.clear_cache()
        if cache and use_int4_kernel and self._int4_problem() is None:
            self._int4 = pack_int4(self.codes(), self.scales, self.zeros(), self.group_size)
        elif cache and self.qweight.device.type != "meta":
            weight = self.dequantize()
            weight._is_hf_initialized = True  # transformers' init functions skip flagged tensors
            self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out], in x's dtype."""
        if self._int4 is not None and x.device.type == "cpu":
            return int4_linear(x, self._int4, self.bias)
        weight = self.weight
        if weight.numel() == 0 or weight.device != self.qweight.device:
            weight = self.dequantize()
            if self._cache_weight:
                self.weight = weight
        bias = self.bias
        if x.dtype != weight.dtype:  # e.g. fp32 inputs to a bf16 model: compute in the weight dtype, hand back x's
            out = F.linear(x.to(weight.dtype), weight, bias.to(weight.dtype) if bias is not None else None)
            return out.to(x.dtype)
        return F.linear(x, weight, bias.to(weight.dtype) if bias is not None else None)
