"""Uniform access to quantizable layers: nn.Linear and transformers' Conv1D (GPT-2 style).

Everything in the package sees a weight as [out, in]; Conv1D stores it as [in, out] and is transposed here.
Bottom-layer helpers (like `schemes`): no I/O, no logging.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None


_CONV1D = _conv1d_type()


def is_quantizable(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2 style, weight stored [in, out])."""
    return isinstance(module, nn.Linear) or (_CONV1D is not None and isinstance(module, _CONV1D))


def is_conv1d(module: nn.Module) -> bool:
    return _CONV1D is not None and isinstance(module, _CONV1D)


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (Conv1D stores it transposed)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_layer_weight(module: nn.Module, weight_out_in: torch.Tensor) -> None:
    """Write a [out, in] weight back into the module in its own layout and dtype."""
    w = weight_out_in.t() if is_conv1d(module) else weight_out_in
    with torch.no_grad():
        module.weight.copy_(w.to(module.weight.dtype))


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features)."""
    out_f, in_f = layer_weight(module).shape
    return int(out_f), int(in_f)
