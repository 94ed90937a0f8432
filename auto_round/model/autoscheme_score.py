"""AutoScheme's delta-loss scores, computed block by block.

For one option (every candidate layer RTN-quantized with it at once) the score of layer l is the
first-order Taylor estimate of how much its quantization changes the LM loss L:

    score_l = sum |dL/dW_hat * (W - W_hat)|                          (weight term)
            + sum |dL/dx_hat * (x - x_hat)|   over every token        (activation term, act_bits < 16)

L is the mean next-token cross-entropy of the quantized model on the calibration ids (labels = ids,
padding ignored). Memory stays near one block plus the hidden states:
1. capture block 0's inputs once (block_inputs.py), then run the blocks one at a time with the option's
   qdq weights (no grad), keeping each block's input h_i [n, T, H] on the CPU;
2. tail: run the model with every block a pass-through except the last, which returns h_L as a leaf,
   so only the embeddings, final norm and lm_head compute; backward gives g_L = dL/dh_L;
3. walk the blocks in reverse: recompute block i on h_i with grad, backpropagate g_{i+1}: that gives
   dL/dW_hat of its layers (accumulated over batches) and g_i = dL/dh_i for the block before.
The qdq weights are recomputed in step 3 rather than cached (RTN is cheap next to the forward pass).
GGUF options are quantized as the run will quantize them: with `gguf_imatrix`, llama.cpp's searches are
weighted by the imatrix (sum of squared fp inputs per channel) of one extra fp forward of the chain.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.act_quant import needs_act_calibration
from ..algorithms.opt_rtn import imatrix_hooks
from ..algorithms.signround import make_tunable, nvfp4_global_scales
from ..layers import layer_weight
from ..quant.act_qdq import qdq_act
from ..schemes import QuantScheme
from .block_inputs import BlockCall, block_output, capture_block_inputs
from .tail_inputs import blocks_stood_in

logger = logging.getLogger("auto_round")


class _QdqLinear:
    """Makes a Linear/Conv1D compute F.linear(x_hat, W_hat, bias) with its option's RTN qdq weight;
    with grad=True W_hat is a leaf collecting dL/dW_hat and the activation term is accumulated."""

    def __init__(self, module: nn.Module, scheme: QuantScheme, w_hat: torch.Tensor, grad: bool):
        self.module, self.scheme = module, scheme
        self.w_hat = w_hat.detach().requires_grad_(grad)
        self.act_term = 0.0
        self._own = module.__dict__.get("forward")
        bias = module.bias

        def forward(x: torch.Tensor) -> torch.Tensor:
            if scheme.quantizes_activations:
                x = self._qdq_input(x, grad)
            b = bias.to(x.dtype) if bias is not None else None
            return F.linear(x, self.w_hat.to(x.dtype), b)

        module.forward = forward

    def _qdq_input(self, x: torch.Tensor, grad: bool) -> torch.Tensor:
        s = self.scheme
        with torch.no_grad():  # static ranges: this batch's max |x| stands in for the calibrated one
            act_max = x.abs().amax().float() if needs_act_calibration(s) else None
            xq = qdq_act(x, s.resolved_act_data_type, s.act_bits, s.resolved_act_group_size,
                         sym=s.resolved_act_sym, act_max=act_max)
            diff = (x - xq).float()
        x_hat = x + (xq - x).detach()  # straight-through: dL/dx = dL/dx_hat for the blocks before
        if grad and x_hat.requires_grad:
            def hook(g: torch.Tensor) -> None:
                self.act_term += float((g.float() * diff).abs().sum())
            x_hat.register_hook(hook)
        return x_hat

    def weight_term(self) -> float:
        if self.w_hat.grad is None:
            return 0.0
        w = layer_weight(self.module).detach().to(self.w_hat.device, torch.float32)
        return float((self.w_hat.grad.float() * (w - self.w_hat.detach().float())).abs().sum())

    def remove(self) -> None:
        if self._own is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self._own


@torch.no_grad()
def _rtn_weights(layers: dict[str, tuple[nn.Module, QuantScheme]], device: str, scale_dtype: torch.dtype,
                 imatrix: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """RTN qdq weight [out, in] fp32 of each layer (NVFP4 fused siblings share a global scale, as in export;
    ggml types search with the layer's imatrix where one is given)."""
    gscales = nvfp4_global_scales(layers)
    imatrix = imatrix or {}
    out = {}
    for name, (module, scheme) in layers.items():
        t = make_tunable(module, scheme, scale_dtype=scale_dtype, enable_minmax_tuning=False, device=device,
                         gscale=gscales.get(name), imatrix=imatrix.get(name) if scheme.gguf is not None else None)
        out[name] = t.qdq_weight().detach()
    return out


def _install(layers: dict[str, tuple[nn.Module, QuantScheme]], device: str, scale_dtype: torch.dtype,
             grad: bool, imatrix: dict[str, torch.Tensor]) -> dict[str, _QdqLinear]:
    w_hats = _rtn_weights(layers, device, scale_dtype, imatrix)
    return {n: _QdqLinear(m, s, w_hats[n], grad) for n, (m, s) in layers.items()}


def _gguf_imatrix(blocks: Sequence[nn.Module], captured, option_layers, batch: int, device: str,
                  scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """name -> [in] sum of squared fp inputs of every block layer an option quantizes to a ggml type."""
    modules = {n: (m, s) for layers in option_layers for n, (m, s) in layers.items() if s.gguf is not None}
    if not modules:
        return {}
    with imatrix_hooks(modules) as imatrix:  # no patches: every layer computes with its fp weight
        _forward_chain(blocks, captured, [{} for _ in blocks], batch, device, scale_dtype, {})
    return dict(imatrix)


def _remove(patches: dict) -> None:
    """Undo the forward patches (_QdqLinear here, _FisherLinear in autoscheme_fisher.py)."""
    for p in patches.values():
        p.remove()


def _split_by_block(layers: dict, block_names: Sequence[str]) -> tuple[list[dict], dict]:
    """({name: v} of each block's layers in block order, {name: v} of the layers outside every block)."""
    per_block = [{n: v for n, v in layers.items() if n.startswith(b + ".")} for b in block_names]
    outside = {n: v for n, v in layers.items() if not any(n.startswith(b + ".") for b in block_names)}
    return per_block, outside


def _batches(n: int, batch: int) -> list[torch.Tensor]:
    return [torch.arange(s, min(s + batch, n)) for s in range(0, n, batch)]


def _tail_grad(model: nn.Module, blocks: Sequence[nn.Module], h_last: torch.Tensor, ids: torch.Tensor,
               mask: torch.Tensor, batch: int, device: str, is_tuple: bool,
               after_backward: Optional[Callable[[], object]] = None) -> tuple[torch.Tensor, float]:
    """(dL/dh_L [n, T, H], L) with L the token-mean cross-entropy over all samples; after_backward runs
    after each batch's backward (the Fisher scoring reads the per-sample weight gradients there)."""
    labels = ids.masked_fill(mask == 0, -100)
    n_tokens = int((labels[:, 1:] != -100).sum())
    grad = torch.zeros_like(h_last, dtype=torch.float32)
    total = 0.0
    with blocks_stood_in(blocks, is_tuple) as current:
        for idx in _batches(ids.shape[0], batch):
            h = h_last[idx].to(device).requires_grad_(True)
            current["h"] = h
            lab = labels[idx].to(device)
            with torch.enable_grad():
                out = model(input_ids=ids[idx].to(device), attention_mask=mask[idx].to(device), labels=lab,
                            use_cache=False)
                weight = int((lab[:, 1:] != -100).sum()) / max(n_tokens, 1)  # batch mean -> dataset mean
                loss = out.loss * weight
                loss.backward()
            if after_backward is not None:
                after_backward()
            total += float(loss.detach())
            grad[idx] = h.grad.float().cpu()
    return grad, total


def delta_loss_scores(
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
    """Per option k, {layer: score} for the layers of option_layers[k] (name -> (module, scheme)).

    Layers inside the blocks and outside them (lm_head with quant_lm_head) are both scored; a layer not
    listed for an option (kept in fp under it) has no score there (the caller counts 0). gguf_imatrix: ggml
    types are searched with the block layers' imatrix (as opt-RTN / tuning will quantize them).
    """
    names = [n for n, _ in blocks]
    mods = [b for _, b in blocks]
    captured = capture_block_inputs(model, mods, input_ids, attention_mask, device=device)
    imatrix = _gguf_imatrix(mods, captured, option_layers, batch_size, device, scale_dtype) if gguf_imatrix else {}
    scores: list[dict[str, float]] = []
    for k, layers in enumerate(option_layers):
        start = time.perf_counter()
        per_block, outside = _split_by_block(layers, names)
        hs, is_tuple = _forward_chain(mods, captured, per_block, batch_size, device, scale_dtype, imatrix)
        head = _install(outside, device, scale_dtype, grad=True, imatrix=imatrix)
        try:
            # one sample at a time: the tail's logits (and their softmax and grad) are T x vocab x 4 bytes
            # each per sample (SmolLM2: 50 MB), the largest tensors of the whole scoring at any batch size
            g, loss = _tail_grad(model, mods, hs[-1], input_ids, attention_mask, 1, device, is_tuple)
        finally:
            _remove(head)
        result = {n: p.weight_term() + p.act_term for n, p in head.items()}
        for i in reversed(range(len(mods))):
            g, block_scores = _backward_block(mods[i], hs[i], captured.calls[i], g, per_block[i], batch_size,
                                              device, scale_dtype, imatrix, need_input_grad=i > 0)
            result.update(block_scores)
            hs[i + 1] = None  # type: ignore[call-overload]  (free as we go)
        scores.append(result)
        logger.info("AutoScheme: option %d/%d scored in %.1f s (quantized-model loss %.4f)", k + 1,
                    len(option_layers), time.perf_counter() - start, loss)
    return scores


@torch.no_grad()
def _forward_chain(blocks: Sequence[nn.Module], captured, per_block, batch: int, device: str,
                   scale_dtype: torch.dtype, imatrix: dict[str, torch.Tensor]) -> tuple[list, bool]:
    """Inputs of every block and the last block's output (CPU), with the option's qdq weights."""
    hs = [captured.hidden_states]
    is_tuple = False
    for block, call, layers in zip(blocks, captured.calls, per_block):
        block.to(device)
        patches = _install(layers, device, scale_dtype, grad=False, imatrix=imatrix)
        try:
            outs = []
            for idx in _batches(hs[-1].shape[0], batch):
                args, kwargs = call.select(idx, device)
                raw = block(hs[-1][idx].to(device), *args, **kwargs)
                is_tuple = isinstance(raw, tuple)
                outs.append(block_output(raw).to("cpu"))
            hs.append(torch.cat(outs, dim=0))
        finally:
            _remove(patches)
            if device != "cpu":
                block.to("cpu")
    return hs, is_tuple


def _backward_block(block: nn.Module, h_in: torch.Tensor, call: BlockCall, g_out: torch.Tensor, layers,
                    batch: int, device: str, scale_dtype: torch.dtype, imatrix: dict[str, torch.Tensor],
                    need_input_grad: bool) -> tuple[Optional[torch.Tensor], dict[str, float]]:
    """Recompute the block with grad, backpropagate g_out: (dL/dh_in or None, {layer: score})."""
    block.to(device)
    patches = _install(layers, device, scale_dtype, grad=True, imatrix=imatrix)
    g_in = torch.zeros_like(h_in, dtype=torch.float32) if need_input_grad else None
    try:
        for idx in _batches(h_in.shape[0], batch):
            x = h_in[idx].to(device).requires_grad_(need_input_grad)
            args, kwargs = call.select(idx, device)
            with torch.enable_grad():
                out = block_output(block(x, *args, **kwargs))
                if out.requires_grad:
                    out.backward(g_out[idx].to(device, out.dtype))
            if need_input_grad and x.grad is not None:
                g_in[idx] = x.grad.float().cpu()
        result = {n: p.weight_term() + p.act_term for n, p in patches.items()}
    finally:
        _remove(patches)
        if device != "cpu":
            block.to("cpu")
    return g_in, result
