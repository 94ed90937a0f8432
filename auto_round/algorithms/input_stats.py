"""Statistics of layer inputs gathered while a block runs on calibration data (imatrix, act_max)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


@contextmanager
def input_stat_hooks(modules: dict[str, nn.Module], stat: Callable[[torch.Tensor], torch.Tensor],
                     combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """While active, name -> combine(previous, stat(x)) over every call, x the module's (detached) first input."""
    stats: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_mod, args):
            value = stat(args[0].detach())
            stats[name] = value if name not in stats else combine(stats[name], value)
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
