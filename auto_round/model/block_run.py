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
        raw = block(inputs[idx].to(device), *args, **kwargs)
        call.output_is_tuple = isinstance(raw, tuple)
        return block_output(raw)

    return run


@torch.no_grad()
def run_batched(block: nn.Module, inputs: torch.Tensor, call: BlockCall, batch: int, device: str) -> torch.Tensor:
    """Block outputs [n, T, H] for all samples, computed `batch` samples at a time, stored where `inputs` are.

    Each batch's output is copied into one preallocated tensor as it comes (a torch.cat of the pieces would
    hold the whole chain twice at its peak)."""
    run = block_runner(block, inputs, call, device)
    n, out = inputs.shape[0], None
    for s in range(0, n, batch):
        piece = run(list(range(s, min(s + batch, n))))
        if out is None:
            out = torch.empty((n, *piece.shape[1:]), dtype=piece.dtype, device=inputs.device)
        out[s : s + piece.shape[0]].copy_(piece)
    return out
