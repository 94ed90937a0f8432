"""Inputs of the layers after the blocks (lm_head with quant_lm_head), for their static activation ranges.

A static activation scheme (FP8_STATIC, NVFP4's static global scale, INT8 static) on lm_head needs the max
|x| of lm_head's input over the calibration set, i.e. of whatever the model puts between its last block and
lm_head (the final norm; OPT's project_out, ...). The block walk ends with the last block's fp outputs
h_last [n, T, H]. The model's own forward is run on the calibration ids with every block standing in for
itself (the blocks' weights may already be packed and released): all but the last pass their input
through, the last returns h_last, answering in the form the real blocks did (tensor or tuple,
`BlockCall.output_is_tuple`). The forward stops at the first of the wanted layers' pre-hooks once all of
them have seen their input, so the logits (a [n, T, vocab] matmul) are not computed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..algorithms.act_quant import act_max_hooks, needs_act_calibration
from ..schemes import QuantScheme


@contextmanager
def blocks_stood_in(blocks: Sequence[nn.Module], output_is_tuple: bool) -> Iterator[dict[str, torch.Tensor]]:
    """While active, the model's forward skips its blocks: all but the last pass their input through, the last
    returns `current["h"]` (the caller sets it before each forward), answering as the real blocks did (a
    tensor, or a 1-tuple). Yields `current`; the blocks' own forwards are restored on exit."""
    as_output = (lambda h: (h,)) if output_is_tuple else (lambda h: h)
    current: dict[str, torch.Tensor] = {}

    def passthrough(*args, **kwargs):
        return as_output(args[0] if args else kwargs["hidden_states"])

    def last(*_args, **_kwargs):
        return as_output(current["h"])

    own = [b.__dict__.get("forward") for b in blocks]
    for b in blocks[:-1]:
        b.forward = passthrough
    blocks[-1].forward = last
    try:
        yield current
    finally:
        for b, f in zip(blocks, own):
            if f is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = f


class _TailSeen(Exception):
    """Raised by a pre-hook once every wanted layer has seen this batch's input."""


@torch.no_grad()
def outside_input_max(model: nn.Module, blocks: Sequence[nn.Module], output_is_tuple: Optional[bool],
                      h_last: torch.Tensor,
                      input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      layers: dict[str, tuple[nn.Module, QuantScheme]], *, batch: int,
                      device: str = "cpu") -> dict[str, torch.Tensor]:
    """{layer name: max |input| ([] fp32)} over the calibration set for the static-activation layers among
    `layers` (modules outside the blocks), from the last block's fp outputs h_last [n, T, H] (module docstring).
    input_ids / attention_mask [n, T]: the calibration samples h_last was computed from. output_is_tuple: the
    form the blocks' outputs took (`BlockCall.output_is_tuple` of a block that ran)."""
    wanted = {n: lm for n, lm in layers.items() if needs_act_calibration(lm[1])}
    if not wanted:
        return {}
    if output_is_tuple is None:
        raise RuntimeError("the blocks' output form was never seen: outside_input_max runs after a block walk")
    seen: set[str] = set()

    def stop_when_all_seen(name: str):
        def hook(_module, _args):
            seen.add(name)
            if seen == set(wanted):
                raise _TailSeen
        return hook

    # act_max_hooks registered first, so it records before the stop hook raises
    with blocks_stood_in(blocks, output_is_tuple) as current, act_max_hooks(wanted) as act_max:
        handles = [m.register_forward_pre_hook(stop_when_all_seen(n)) for n, (m, _) in wanted.items()]
        try:
            for start in range(0, h_last.shape[0], batch):
                rows = slice(start, start + batch)
                current["h"] = h_last[rows].to(device)
                seen.clear()
                try:
                    model(input_ids=input_ids[rows].to(device), attention_mask=attention_mask[rows].to(device),
                          use_cache=False)
                except _TailSeen:
                    pass
        finally:
            for h in handles:
                h.remove()
    missing = sorted(set(wanted) - set(act_max))
    if missing:
        raise RuntimeError(f"the model's forward never reached {', '.join(missing)} after its blocks; their static "
                           "activation ranges cannot be calibrated")
    return dict(act_max)
