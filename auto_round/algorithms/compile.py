"""torch.compile for the MX / NVFP4 activation qdq of the tuning forward (`enable_torch_compile`).

What is compiled: the pure kernels of `quant.act_fused` (the forward `mx_forward` / `nvfp4_forward` and the
hand-derived `group_qdq_backward`), each once per process (shapes: torch's automatic dynamic marking).
A kernel whose compilation fails falls back to eager with one warning, so a broken toolchain costs
speed, not the run.

Off unless asked for (`enable_torch_compile=True`, CLI `--enable_torch_compile`): the compiled forward is
bit-identical to eager, but the backward's sums run in another order, so a few of SignRound's rounding
decisions can differ from an eager run (and from a machine without a compiler). Measured on this project's CPU
box (SmolLM2 block 5, fp32, `bench/step_flops.py`, bench/results/2026-12-06-step-flops-act-quantizers-fixed.md):
one thread, MXFP4 0.700-0.872 s a step eager vs 0.680-0.717 compiled, NVFP4 0.811-0.863 vs 0.686-0.779; two
threads MXFP4 0.45-0.49 vs 0.37-0.40; compilation 5-15 s once per process. A whole SmolLM2 MXFP4 SignRound run
(50 iters, two threads) did not get faster (643.5 s compiled, 641.3 s eager), so eager stays the default; on
CUDA, where every eager op is a kernel launch, compiling is expected to pay (not measured here).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from typing import Callable, Iterable, Optional

import torch

from ..quant.act_fused import GroupQdqKernels
from ..quant.act_qdq import FUSED_ACT_DATA_TYPES
from ..schemes import QuantScheme

logger = logging.getLogger("auto_round")

class _CompiledKernel:
    """A kernel run through torch.compile (torch's automatic dynamic shapes), falling back to eager for good
    on failure."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled = torch.compile(fn)
        self.failed = False
        self.__name__ = fn.__name__

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as err:  # a missing / broken compiler toolchain: eager still gives the result
                self.failed = True
                logger.warning("torch.compile of %s failed (%s: %s); running it eagerly",
                               self.fn.__name__, type(err).__name__, str(err).splitlines()[0][:200])
        return self.fn(*args)


_COMPILED: dict[Callable, _CompiledKernel] = {}


def _compiled(fn: Callable) -> Callable:
    if fn not in _COMPILED:
        _COMPILED[fn] = _CompiledKernel(fn)
    return _COMPILED[fn]


COMPILED_KERNELS = GroupQdqKernels(_compiled)


def compiler_available(device: str) -> bool:
    """Whether Inductor can build kernels for `device`: a C++ compiler on CPU, triton on CUDA / XPU."""
    kind = torch.device(device).type
    if kind == "cpu":
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    return importlib.util.find_spec("triton") is not None


def uses_fused_act_qdq(schemes: Iterable[QuantScheme]) -> bool:
    """Whether any scheme quantizes activations with a type `act_fused` runs (MX / NVFP4)."""
    return any(s.quantizes_activations and s.resolved_act_data_type in FUSED_ACT_DATA_TYPES for s in schemes)


def act_qdq_kernels(enable: Optional[bool], *, device: str, schemes: Iterable[QuantScheme]) -> Optional[GroupQdqKernels]:
    """The kernels for the tuning forward's activation qdq: COMPILED_KERNELS or None (eager).

    enable: the user's `enable_torch_compile`; None (auto) is eager, see the module docstring.
    """
    if not enable or not uses_fused_act_qdq(schemes):
        return None
    if not compiler_available(device):
        logger.warning("enable_torch_compile: no compiler for %s (a C++ compiler on CPU, triton on CUDA); "
                       "the activation qdq runs eagerly", device)
        return None
    return COMPILED_KERNELS
