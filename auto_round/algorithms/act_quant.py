"""Activation quantization on a layer's input, during tuning and in the fake-quantized model.

A scheme with act_bits < 16 gets an `ActQuantizer` installed as a forward pre-hook on its Linear: the
input x [..., in] is replaced by qdq_act(x) before the matmul, in the tuning forward (so SignRound sees
the activation error) and afterwards (the returned model computes what the deployed one does).

Static schemes (act_dynamic=False, and NVFP4's "nv_fp4_with_static_gs") need `act_max`, the max |x|
over the calibration inputs, per tensor; `act_max_hooks` collects it on the block's fp inputs. Static
int / fp8 activations also get a tunable clip `max_scale` (the reference's act_max_scale, init 1, [0, 1]).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..quant.act_fused import GroupQdqKernels
from ..quant.act_qdq import qdq_act
from ..schemes import QuantScheme
from .input_stats import input_stat_hooks


def needs_act_calibration(scheme: QuantScheme) -> bool:
    """True when the activation range is calibrated once (static) rather than taken from each input."""
    if not scheme.quantizes_activations:
        return False
    return not scheme.act_dynamic or scheme.resolved_act_data_type == "nv_fp4_with_static_gs"


# the module attribute naming the ActQuantizer installed on a layer (one at most)
ACT_QUANTIZER_ATTR = "_auto_round_act_quantizer"


class SharedInputQdq:
    """Lets quantizers fed the same input tensor (q/k/v after the input norm, gate/up after the post-attention
    norm) compute its qdq once. One slot: a call stores (key, x, x's version, grad mode, result), and the
    next call with the same quantizer key and the very same tensor object, unmodified, in the same grad
    mode, returns the stored result; anything else replaces it. The consumers of one tensor run back to
    back in a decoder layer, so one slot catches them all while holding at most one input and one result.
    Autograd sums the consumers' gradients into the one node, which is the gradient of separate qdqs (the
    qdq's backward is linear in the incoming gradient)."""

    def __init__(self) -> None:
        self._slot: Optional[tuple] = None

    def __call__(self, key, x: torch.Tensor, compute) -> torch.Tensor:
        grad_mode = torch.is_grad_enabled()
        slot = self._slot
        if slot is not None and slot[0] == key and slot[1] is x and slot[2] == x._version and slot[3] == grad_mode:
            return slot[4]
        self._slot = None  # drop the old pair before computing the new one
        out = compute(x)
        self._slot = (key, x, x._version, grad_mode, out)
        return out

    def clear(self) -> None:
        self._slot = None


class ActQuantizer:
    """qdq of a layer's input under `scheme`'s act_* fields. act_max: [] fp32 for static schemes.

    kernels: how MX / NVFP4 qdq runs (eager, or torch.compile'd: `algorithms.compile`); shared: a
    `SharedInputQdq` of the block (tuning) or the model (loader), used when this quantizer has no tunable clip (its qdq is then a
    function of the input and the scheme alone)."""

    def __init__(self, scheme: QuantScheme, act_max: Optional[torch.Tensor] = None, *,
                 tune_clip: bool = False, scale_dtype: torch.dtype = torch.float16,
                 kernels: Optional[GroupQdqKernels] = None, shared: Optional[SharedInputQdq] = None):
        if needs_act_calibration(scheme) and act_max is None:
            raise ValueError(f"static activation quantization ({scheme.resolved_act_data_type}) needs a calibrated "
                             "act_max; none was collected for this layer (did it see calibration tokens?)")
        self.scheme = scheme
        self.act_max = None if act_max is None else act_max.detach().float().reshape(())
        # only a static int / fp8 range is a single number a clip can scale; NVFP4's per-16 maxima stay dynamic
        tunable = tune_clip and not scheme.act_dynamic
        self.max_scale = torch.ones((), device=self.act_max.device if self.act_max is not None else None,
                                    requires_grad=tunable)
        self.scale_dtype = scale_dtype
        self.kernels = kernels
        self.shared = None if tunable else shared
        act = (scheme.resolved_act_data_type, scheme.act_bits, scheme.resolved_act_group_size, scheme.resolved_act_sym)
        self._share_key = (act, None if self.act_max is None else float(self.act_max), str(scale_dtype))
        self._handle = None
        self._module: Optional[nn.Module] = None

    def params(self) -> list[torch.Tensor]:
        return [self.max_scale] if self.max_scale.requires_grad else []

    def clamp_(self) -> None:
        with torch.no_grad():
            self.max_scale.clamp_(0.0, 1.0)

    @property
    def effective_act_max(self) -> Optional[torch.Tensor]:
        """The static range after the tuned clip (what export turns into input scales); None if dynamic."""
        if self.act_max is None:
            return None
        clip = self.max_scale.detach() if not self.scheme.act_dynamic else 1.0
        return self.act_max * clip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.shared(self._share_key, x, self._qdq)
        return self._qdq(x)

    def _qdq(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scheme
        static_clip = self.max_scale if (self.act_max is not None and not s.act_dynamic) else None
        return qdq_act(x, s.resolved_act_data_type, s.act_bits, s.resolved_act_group_size, sym=s.resolved_act_sym,
                       act_max=self.act_max, max_scale=static_clip, scale_dtype=self.scale_dtype,
                       kernels=self.kernels)

    def install(self, module: nn.Module) -> None:
        """Quantize `module`'s input from now on (idempotent). A quantizer another call left on the module
        (`module._auto_round_act_quantizer`, e.g. from tuning the block before) is removed first: stacked,
        the two would quantize the input twice."""
        previous = getattr(module, ACT_QUANTIZER_ATTR, None)
        if previous is not None and previous is not self:
            previous.remove()
        if self._handle is None:
            self._handle = module.register_forward_pre_hook(lambda _m, args: (self(args[0]), *args[1:]))
            self._module = module
            setattr(module, ACT_QUANTIZER_ATTR, self)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            if getattr(self._module, ACT_QUANTIZER_ATTR, None) is self:
                delattr(self._module, ACT_QUANTIZER_ATTR)
            self._module = None


def act_max_hooks(layers: dict[str, tuple[nn.Module, QuantScheme]]):
    """While active, track max |x| ([] fp32) of the input of every layer whose scheme is static."""
    static = {n: m for n, (m, s) in layers.items() if needs_act_calibration(s)}
    return input_stat_hooks(static, lambda x: x.abs().amax().float(), torch.maximum)
