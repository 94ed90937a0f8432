"""Running one block on captured inputs: per-sample selection of the call arguments, batched no-grad passes."""

from __future__ import annotations

import torch
from torch import nn

from .block_inputs import BlockCall, block_output


def block_runner(block: nn.Module, inputs: torch.Tensor, call: BlockCall, device: str):
    """run(indices) -> the block's output [len(indices), T, H] for those samples of `inputs` [n, T, H]."""

    def run(indices: list[int]) -> torch.Tensor:
        idx = torch.tensor(indices, dtype=torch.long)
        args, kwargs = call.select(idx, device)
        return block_output(block(inputs[idx].to(device), *args, **kwargs))

    return run


@torch.no_grad()
def run_batched(block: nn.Module, inputs: torch.Tensor, call: BlockCall, batch: int, device: str) -> torch.Tensor:
    """Block outputs [n, T, H] for all samples, computed `batch` samples at a time, stored on CPU."""
    run = block_runner(block, inputs, call, device)
    outs = [run(list(range(s, min(s + batch, inputs.shape[0])))).to(inputs.device) for s in range(0, inputs.shape[0], batch)]
    return torch.cat(outs, dim=0)
