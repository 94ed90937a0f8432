"""AutoScheme's Fisher scores: a second-order estimate of each option's loss change, from one pass.

The delta-loss score (autoscheme_score.py) takes the gradient at the model with EVERY candidate layer
quantized by the option at once. For a low-bit option (W2 on a small model: perplexity in the thousands)
that gradient is measured in a broken model, far from where the plan will put most layers. Here the
gradient is taken once, at the fp weights, per calibration sample, and each option's error is weighed by
the diagonal empirical Fisher (HAWQ / SqueezeLLM style):

    score_l(option) = 1/2 * sum_ij F_ij (W - W_hat)_ij^2,    F = sum_s (dL_s/dW)^2       (weight term)
                    + 1/2 * sum_{s,t,j} (dL_s/dx_tj)^2 (x - x_hat)_tj^2                   (activation term)

L_s is sample s's share of the token-mean cross-entropy (labels = ids). A static activation option's
x_hat uses the run's kind of scale: the max |x| over the whole calibration set (of the fp chain; for lm_head
from the model's tail on the chain's end, model/tail_inputs.py, as the run calibrates it). The forward, tail
and backward run once for all options (the delta-loss scoring runs them once per option); the backward goes one
sample at a time, because F needs the per-sample gradients. Memory: as the delta-loss scoring, plus F
(fp32, one block's layers) while a block is walked.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.act_quant import act_max_hooks, needs_act_calibration
from ..algorithms.opt_rtn import imatrix_hooks
from ..layers import layer_weight
from ..quant.act_qdq import qdq_act
from ..schemes import QuantScheme
from .autoscheme_score import _forward_chain, _remove, _rtn_weights, _split_by_block, _tail_grad
from .block_inputs import BlockCall, block_output, capture_block_inputs
from .tail_inputs import outside_input_max

logger = logging.getLogger("auto_round")


class _FisherLinear:
    """Makes a layer compute with a leaf copy of its fp weight; after each sample's backward,
    `accumulate` adds the squared weight gradient to F, and the activation term of every option that
    quantizes this layer's input is added from the input gradient."""

    def __init__(self, module: nn.Module, act_options: dict[int, QuantScheme], device: str,
                 act_max: Optional[torch.Tensor] = None):
        self.module, self.act_options, self.act_max = module, act_options, act_max
        self.w = layer_weight(module).detach().to(device, torch.float32).requires_grad_(True)
        self.fisher = torch.zeros_like(self.w)
        self.act_terms = {k: 0.0 for k in act_options}
        self._own = module.__dict__.get("forward")
        bias = module.bias

        def forward(x: torch.Tensor) -> torch.Tensor:
            if act_options and x.requires_grad:
                x.register_hook(self._act_hook(x.detach()))
            b = bias.to(x.dtype) if bias is not None else None
            return F.linear(x, self.w.to(x.dtype), b)

        module.forward = forward

    def _act_hook(self, x: torch.Tensor):
        def hook(g: torch.Tensor) -> None:
            g2 = g.float().pow(2)
            for k, s in self.act_options.items():
                act_max = None
                if needs_act_calibration(s):  # the calibration set's max (this sample's if none was given)
                    act_max = self.act_max if self.act_max is not None else x.abs().amax().float()
                xq = qdq_act(x, s.resolved_act_data_type, s.act_bits, s.resolved_act_group_size,
                             sym=s.resolved_act_sym, act_max=act_max)
                self.act_terms[k] += 0.5 * float((g2 * (x - xq).float().pow(2)).sum())
        return hook

    def accumulate(self) -> None:
        if self.w.grad is not None:
            self.fisher += self.w.grad.float().pow(2)
            self.w.grad = None

    def weight_term(self, w_hat: torch.Tensor) -> float:
        return 0.5 * float((self.fisher * (self.w.detach() - w_hat.float()).pow(2)).sum())

    def remove(self) -> None:
        if self._own is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self._own


def _patch(layers: dict[str, nn.Module], option_layers, device: str,
           act_max: dict[str, torch.Tensor]) -> dict[str, _FisherLinear]:
    acts = {n: {k: ol[n][1] for k, ol in enumerate(option_layers) if n in ol and ol[n][1].quantizes_activations}
            for n in layers}
    return {n: _FisherLinear(m, acts[n], device, act_max.get(n)) for n, m in layers.items()}


def _scores(patches: dict[str, _FisherLinear], option_layers, device: str, scale_dtype: torch.dtype,
            imatrix: dict[str, torch.Tensor], result: list[dict[str, float]]) -> None:
    """Add each option's score of the patched layers to result[k] (a layer an option keeps in fp: none)."""
    for k, layers in enumerate(option_layers):
        mine = {n: layers[n] for n in patches if n in layers}
        w_hats = _rtn_weights(mine, device, scale_dtype, imatrix)
        for n in mine:
            result[k][n] = patches[n].weight_term(w_hats[n]) + patches[n].act_terms.get(k, 0.0)


def fisher_scores(
    model: nn.Module,
    blocks: Sequence[tuple[str, nn.Module]],
    option_layers: Sequence[dict[str, tuple[nn.Module, QuantScheme]]],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    scale_dtype: torch.dtype = torch.float16,
    gguf_imatrix: bool = False,
) -> list[dict[str, float]]:
    """Per option k, {layer: Fisher score} for the layers of option_layers[k]; the same contract as
    autoscheme_score.delta_loss_scores (gguf_imatrix: ggml types searched with the fp chain's imatrix)."""
    start = time.perf_counter()
    names = [n for n, _ in blocks]
    mods = [b for _, b in blocks]
    candidates = {n: m for layers in option_layers for n, (m, _) in layers.items()}
    per_block, outside = _split_by_block(candidates, names)
    captured = capture_block_inputs(model, mods, input_ids, attention_mask, device=device)
    ggml = {n: (m, s) for layers in option_layers for n, (m, s) in layers.items()
            if gguf_imatrix and s.gguf is not None and n not in outside}
    static = {n: (m, s) for layers in option_layers for n, (m, s) in layers.items()
              if needs_act_calibration(s) and n not in outside}
    maxima = act_max_hooks(static)
    # the fp chain (every layer computes with its fp weight) also gives the imatrix of the ggml options and
    # the calibration-set input maxima of static activation options (the run's static scales)
    with imatrix_hooks(ggml) as imatrix, maxima as act_max:
        hs, is_tuple = _forward_chain(mods, captured, [{} for _ in mods], batch_size, device, scale_dtype, {})
    imatrix, act_max = dict(imatrix), dict(act_max)
    # lm_head's static options: the calibration-set max of its input too, from the model's tail on the chain's end
    head_static = {n: (m, s) for layers in option_layers for n, (m, s) in layers.items()
                   if needs_act_calibration(s) and n in outside}
    act_max.update(outside_input_max(model, mods, is_tuple, hs[-1], input_ids, attention_mask, head_static,
                                     batch=batch_size, device=device))
    result: list[dict[str, float]] = [{} for _ in option_layers]
    head = _patch(outside, option_layers, device, act_max)
    try:
        g, loss = _tail_grad(model, mods, hs[-1], input_ids, attention_mask, 1, device, is_tuple,
                             after_backward=lambda: [p.accumulate() for p in head.values()])
        _scores(head, option_layers, device, scale_dtype, imatrix, result)
    finally:
        _remove(head)
    for i in reversed(range(len(mods))):
        g = _backward_block(mods[i], hs[i], captured.calls[i], g, per_block[i], option_layers, device,
                            scale_dtype, imatrix, act_max, result, need_input_grad=i > 0)
        hs[i + 1] = None  # type: ignore[call-overload]  (free as we go)
    logger.info("AutoScheme: %d options scored (Fisher) in %.1f s (fp loss %.4f)", len(option_layers),
                time.perf_counter() - start, loss)
    return result


def _backward_block(block: nn.Module, h_in: torch.Tensor, call: BlockCall, g_out: torch.Tensor,
                    layers: dict[str, nn.Module], option_layers, device: str, scale_dtype: torch.dtype,
                    imatrix: dict[str, torch.Tensor], act_max: dict[str, torch.Tensor],
                    result: list[dict[str, float]], need_input_grad: bool) -> Optional[torch.Tensor]:
    """Recompute the block one sample at a time with grad, accumulate F, score its layers; dL/dh_in."""
    block.to(device)
    patches = _patch(layers, option_layers, device, act_max)
    g_in = torch.zeros_like(h_in, dtype=torch.float32) if need_input_grad else None
    try:
        for s in range(h_in.shape[0]):
            idx = torch.tensor([s])
            # the input always takes grad, so layer inputs do and the activation hooks fire in block 0 too
            x = h_in[idx].to(device).requires_grad_(True)
            args, kwargs = call.select(idx, device)
            with torch.enable_grad():
                out = block_output(block(x, *args, **kwargs))
                if out.requires_grad:
                    out.backward(g_out[idx].to(device, out.dtype))
            for p in patches.values():
                p.accumulate()
            if need_input_grad and x.grad is not None:
                g_in[idx] = x.grad.float().cpu()
        _scores(patches, option_layers, device, scale_dtype, imatrix, result)
    finally:
        _remove(patches)
        if device != "cpu":
            block.to("cpu")
    return g_in
