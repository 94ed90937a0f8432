"""SignRound: tune each layer's rounding offset V and clip scales alpha/beta, one block at a time.

For a block with fp inputs X_fp (fp chain) and inputs X_q (quantized chain):
    target = block_fp(X_fp)                                  (computed by the caller)
    loss   = mean( (mask * (block_q(X_q; V, alpha, beta) - target))^2 )
    theta <- theta - lr_t * sign(grad theta)                  signed SGD, lr_t linear decay to 0
The mask drops padding and the last position of every sample. With `massive_token_cap` > 0 it also scales
down the error of tokens whose target norm exceeds cap x the median token norm (attention sinks with massive
activations; `token_loss_scale`). The parameters with the lowest loss seen are kept (unless
`not_use_best_mse`).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..quant.act_fused import GroupQdqKernels
from ..quant.nvfp_qdq import global_scale_from_amax
from ..schemes import QuantScheme
from .act_quant import ActQuantizer, SharedInputQdq
from .compile import COMPILED_KERNELS
from .alg_ext import (ALG_EXT_SCALE_BOUND, InitScaleTunableLayer, alg_ext_init_scales, outlier_count,
                      outlier_masked_sq_sum, supports_alg_ext, wants_outlier_loss)
from .float_tunable import FloatTunableLayer
from .fused import fused_groups
from .gguf import GGUFTunableLayer, gguf_rtn_block
from .rtn_slices import rtn_in_slices, weight_absmax
from .tunable import LayerQuantResult, TunableLayer

logger = logging.getLogger("auto_round")


@dataclass(frozen=True)
class SignRoundConfig:
    """Tuning knobs (reference defaults). lr / minmax_lr None mean 1/iters."""

    iters: int = 200
    lr: Optional[float] = None
    minmax_lr: Optional[float] = None
    batch_size: int = 8
    gradient_accumulate_steps: int = 1
    enable_minmax_tuning: bool = True
    not_use_best_mse: bool = False
    dynamic_max_gap: int = -1
    seed: int = 42
    # Matmuls of the tuning forward/backward in this dtype (torch.autocast); None = the block's own dtype.
    # Targets and the outputs passed to the next block are computed outside, at full precision.
    amp_dtype: Optional[torch.dtype] = None
    # SignRoundV2 additions (alg_ext.py): searched init scales, max_scale in [0, 2], outlier-masked loss
    enable_alg_ext: bool = False
    # MX / NVFP4 activation qdq of the tuning forward through torch.compile (`algorithms.compile`; the caller
    # sets it from enable_torch_compile when a compiler exists)
    compile_act_qdq: bool = False
    # Tokens whose fp output norm exceeds this multiple of the block's median token norm count in the loss as if
    # scaled down to that norm (relative error kept); 0 = plain masked MSE, as the reference (see token_loss_scale)
    massive_token_cap: float = 0.0
    # MX / NVFP4 / FP8 weights: rebuild each layer's qdq graph in the backward pass instead of keeping it from
    # the forward (`tunable.recomputed_in_backward`): the same gradients bit for bit, 3 bytes per weight less at
    # the block's peak, one more qdq forward per layer and step (+0-25 % of quantize() time measured by
    # bench/recompute_qdq_peak.py). Integer and ggml weights keep ~1-2 bytes per weight in their own single-node
    # qdq (quant/int_qdq_fused.py, the ggml qdq) and ignore this.
    recompute_qdq: bool = False
    # Also tune the clip (max_scale) of weights with e4m3 elements (FP8, MXFP8), as the reference does. Off by
    # default (see `tunes_weight_clip`): with fp8 a smaller scale buys no resolution, it only clips.
    fp8_clip_tuning: bool = False
    # The reference's SignSGD momentum (torch SGD's buffer, no dampening): each step moves by lr * sign(buf) with
    # buf = momentum * buf + grad (buf = grad at the first step); 0 = plain signed gradient steps (the default).
    # One buffer per tuned tensor, for the block being tuned: 4 bytes per weight more.
    momentum: float = 0.0
    # The reference's AdamRound (`enable_adam`, AutoRoundAdam): torch's AdamW (its defaults: betas 0.9 / 0.999,
    # weight decay 0.01) instead of signed steps, with the same learning rates and linear decay. Two fp32 states
    # per tuned tensor, for the block being tuned: 8 bytes per weight more.
    enable_adam: bool = False

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else 1.0 / self.iters

    @property
    def resolved_minmax_lr(self) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.resolved_lr


class IndexSampler:
    """Yields batches of sample indices from shuffles drawn from `rng`; reshuffles when too few remain.

    The caller owns `rng` so one stream can run through every block of a model: each block then sees its
    own batch order. (A fresh `Random(seed)` per block gave every block the same order, so the same easy
    batches won the best-iteration pick in every block and the errors lined up across blocks.)
    """

    def __init__(self, n: int, batch: int, rng: random.Random):
        self.n, self.batch = n, min(batch, n)
        self.rng = rng
        self.order: list[int] = []

    def next(self) -> list[int]:
        if len(self.order) < self.batch:
            self.order = list(range(self.n))
            self.rng.shuffle(self.order)
        out, self.order = self.order[: self.batch], self.order[self.batch :]
        return out


@dataclass
class BlockTuneStats:
    loss_first: float
    loss_best: float
    best_iter: int
    iters_run: int


def loss_mask_from_attention(attention_mask: torch.Tensor) -> torch.Tensor:
    """[n, T] attention mask -> [n, T, 1] float mask of tokens that count in the loss.

    Padding is excluded, and so is the last position of each sample (reference behaviour).
    """
    mask = attention_mask.clone().float()
    mask[:, -1] = 0.0
    return mask.unsqueeze(-1)


def token_loss_scale(targets: torch.Tensor, loss_mask: torch.Tensor, cap: float) -> Optional[torch.Tensor]:
    """[n, T, 1] factor on each token's output error, or None when no token is capped (plain MSE, bit for bit).

    Why: models with massive activations (SmolLM2 from block 11: one channel of the first token reaches ~24,500
    against a median token norm of ~140) have ~99 % of the block-output MSE on a few attention-sink tokens.
    Every later layer sees them only through RMSNorm, where an absolute error e on a token of norm N counts as
    e / N, so the plain loss spends SignRound's sign steps on an error that hardly matters. Capping the weight
    keeps such a token's relative error in the loss at the weight of a token of norm cap x median.
    targets: [n, T, H] fp outputs; loss_mask: [n, T, 1] (1 = counted); cap > 0.
    """
    norms = targets.float().norm(dim=-1, keepdim=True)
    counted = norms[loss_mask > 0]
    if counted.numel() == 0:
        return None
    limit = cap * counted.median()
    if not bool(limit > 0) or not bool((norms > limit).any()):
        return None
    return torch.where(norms > limit, limit / norms, torch.ones_like(norms))


def nvfp4_global_scales(layers: dict[str, tuple[nn.Module, QuantScheme]]) -> dict[str, torch.Tensor]:
    """NVFP4 layers' global scales: each its own 448*6/amax, but fused siblings (q/k/v, gate/up) share the
    smallest, so a runtime that concatenates them keeps one scale (reference default)."""
    nv = {n: m for n, (m, s) in layers.items() if s.is_quantized and s.data_type == "nv_fp"}
    scales = {n: global_scale_from_amax(weight_absmax(m)) for n, m in nv.items()}  # no weight-sized copy
    for group in fused_groups(nv):
        shared = torch.stack([scales[n] for n in group]).amin(dim=0)  # = shared_global_scale of the weights
        scales.update({n: shared for n in group})
    return scales


def tunes_weight_clip(scheme: QuantScheme, config: SignRoundConfig) -> bool:
    """Whether SignRound tunes this layer's weight clip (int alpha / beta, MX / NVFP4 / FP8 max_scale).

    Not for weights with fp8 (e4m3) elements, FP8 and MXFP8, unless `config.fp8_clip_tuning`: e4m3 keeps the
    same relative precision (3 mantissa bits) over its whole normal range, so shrinking a channel's scale makes
    no value finer, it only clips the largest ones (and moves the subnormal edge, 2^-9 of the max, a little; with
    MXFP8's power-of-two scale a multiplier below the next power of two halves the whole block's scale). The
    signed step of +-minmax_lr on a multiplier clamped at 1 then walks it down on noise. SmolLM2, SignRound 50
    iters, fp32, held-out ppl on 32 windows: FP8_STATIC seed 42, weight scales 0.95x RTN's on average and
    19.591 / 19.553 with the weight clip tuned (activation clip tuned / fixed) against 19.479 / 19.511 with it
    fixed (RTN 19.604); MXFP8 seeds 42 / 7, 20.704 / 20.482 tuned against 20.099 / 20.149 fixed (the
    reference, tuned, 20.141 / 20.136; RTN 20.758). The static activation clip is tuned as
    before (tune_clip, ActQuantizer): it made no consistent difference there. Fewer-bit floats (MXFP4, MXFP6,
    NVFP4) have few values per binade and a coarse subnormal range, so their clip is tuned."""
    if not config.enable_minmax_tuning:
        return False
    return config.fp8_clip_tuning or not has_fp8_elements(scheme)


def has_fp8_elements(scheme: QuantScheme) -> bool:
    """FP8 (per-tensor / channel / block scale) and MXFP8 weights: e4m3 values under a scale."""
    return scheme.bits == 8 and scheme.data_type in ("fp", "mx_fp")


def make_tunable(module: nn.Module, scheme: QuantScheme, *, scale_dtype: torch.dtype, enable_minmax_tuning: bool,
                 device, imatrix: Optional[torch.Tensor] = None, gscale: Optional[torch.Tensor] = None,
                 init_scale: Optional[torch.Tensor] = None, alg_ext: bool = False, recompute_qdq: bool = False,
                 fixed_range: Optional[tuple] = None):
    """The tunable state for one layer's weight type: ggml, integer, or MX / NVFP4 / FP8.

    alg_ext (a `supports_alg_ext` scheme): start from `init_scale` (None = multiplier 1), max_scale in [0, 2].
    recompute_qdq: see SignRoundConfig (MX / NVFP4 / FP8 only). fixed_range: (wmin, wmax) [1, 1] of a per-tensor
    int / FP8 group read from the whole weight, for row slices of it (rtn_slices.rtn_in_slices)."""
    if scheme.gguf is not None:
        return GGUFTunableLayer(module, scheme, imatrix=imatrix, device=device)
    if scheme.is_int and alg_ext:
        return InitScaleTunableLayer(module, scheme, init_scale=init_scale, scale_dtype=scale_dtype,
                                     enable_minmax_tuning=enable_minmax_tuning, device=device)
    if scheme.is_int:
        return TunableLayer(module, scheme, scale_dtype=scale_dtype, enable_minmax_tuning=enable_minmax_tuning,
                            device=device, fixed_range=fixed_range)
    return FloatTunableLayer(module, scheme, enable_minmax_tuning=enable_minmax_tuning, device=device,
                             gscale=gscale, init_scale=init_scale, fixed_range=fixed_range,
                             scale_bound=ALG_EXT_SCALE_BOUND if alg_ext else 1.0, recompute_qdq=recompute_qdq)


def install_act_quantizers(layers: dict[str, tuple[nn.Module, QuantScheme]], act_max: dict[str, torch.Tensor], *,
                           tune_clip: bool, scale_dtype: torch.dtype, kernels: Optional[GroupQdqKernels] = None,
                           shared: Optional[SharedInputQdq] = None) -> dict[str, ActQuantizer]:
    """An input quantizer on every layer whose scheme quantizes activations; it stays installed after tuning.
    shared: lets layers fed the same tensor quantize it once (see `end_sharing` for when to stop)."""
    quantizers = {}
    for name, (module, scheme) in layers.items():
        if scheme.quantizes_activations:
            q = ActQuantizer(scheme, act_max.get(name), tune_clip=tune_clip, scale_dtype=scale_dtype,
                             kernels=kernels, shared=shared)
            q.install(module)
            quantizers[name] = q
    return quantizers


def end_sharing(quantizers: dict[str, ActQuantizer], shared: SharedInputQdq) -> None:
    """After tuning: drop the shared inputs / results it holds, and let the installed quantizers (which
    stay for the quantized chain and the returned model) run on their own from now on."""
    shared.clear()
    for q in quantizers.values():
        q.shared = None


def with_act_max(result, quantizer: Optional[ActQuantizer]):
    if quantizer is not None and quantizer.effective_act_max is not None:
        result.act_max = quantizer.effective_act_max.cpu()
    return result


def _signed_step(params: Sequence[torch.Tensor], lr: float, momentum: float = 0.0,
                 buffers: Optional[dict] = None) -> None:
    """p -= lr * sign(d) for each tensor with a gradient, d = its grad or, with momentum, its momentum buffer
    (torch SGD's: buf = momentum * buf + grad, the grad itself at the first step), kept in `buffers` by id(p)."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            d = p.grad
            if momentum:
                buf = buffers.get(id(p))
                if buf is None:
                    buffers[id(p)] = buf = d.clone()
                else:
                    buf.mul_(momentum).add_(d)
                d = buf
            p.add_(d.sign(), alpha=-lr)
            p.grad = None


def tune_block(
    layers: dict[str, tuple[nn.Module, QuantScheme]],
    run_block: Callable[[list[int]], torch.Tensor],
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    config: SignRoundConfig,
    *,
    scale_dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    block_name: str = "",
    imatrix: Optional[dict[str, torch.Tensor]] = None,
    rng: Optional[random.Random] = None,
    act_max: Optional[dict[str, torch.Tensor]] = None,
    on_iter: Optional[Callable[[int, float], None]] = None,
) -> tuple[dict[str, LayerQuantResult], BlockTuneStats]:
    """Tune the quantized layers of one block in place; returns per-layer results and loss stats.

    layers: name -> (module, scheme) of the block's layers to quantize.
    run_block(indices) -> block output [len(indices), T, H] for those calibration samples, computed on
        the tuning inputs (quantized chain) with the patched layers.
    targets: [n, T, H] fp outputs; loss_mask: [n, T, 1].
    imatrix: name -> [in] sum of squared inputs, used by GGUF layers (and, with config.enable_alg_ext, by
        sym int / MX / NVFP4 layers) to search their scales before tuning.
    rng: the batch-order stream; pass one `random.Random(seed)` for the whole model so that blocks get
        different batch orders (None: a fresh `random.Random(config.seed)`, for tuning one block alone).
    act_max: name -> calibrated max |input| ([] fp32) of layers with static activation quantization.
    on_iter(it, loss): called after every iteration's loss (progress bars); must not touch the tensors.
    """
    imatrix = imatrix or {}
    gscales = nvfp4_global_scales(layers)
    ext = {n for n, (_, s) in layers.items() if supports_alg_ext(s)} if config.enable_alg_ext else set()
    init_scales = alg_ext_init_scales({n: layers[n] for n in ext}, imatrix, gscales=gscales,
                                      scale_dtype=scale_dtype, device=device) if ext else {}
    outlier_loss = wants_outlier_loss([layers[n][1] for n in ext])
    tunables = {
        name: make_tunable(m, s, scale_dtype=scale_dtype, enable_minmax_tuning=tunes_weight_clip(s, config),
                           device=device, imatrix=imatrix.get(name), gscale=gscales.get(name),
                           init_scale=init_scales.get(name), alg_ext=name in ext,
                           recompute_qdq=config.recompute_qdq)
        for name, (m, s) in layers.items()
    }
    shared_inputs = SharedInputQdq()
    act_quant = install_act_quantizers(layers, act_max or {}, tune_clip=config.enable_minmax_tuning,
                                       scale_dtype=scale_dtype, kernels=COMPILED_KERNELS if config.compile_act_qdq else None,
                                       shared=shared_inputs)
    round_params = [p for t in tunables.values() for p in t.round_params()]
    minmax_params = [p for t in tunables.values() for p in t.minmax_params()]
    buffers: dict[int, torch.Tensor] = {}  # momentum buffers of this block's tensors (config.momentum > 0)
    minmax_params += [p for q in act_quant.values() for p in q.params()]
    n = targets.shape[0]
    rng = rng if rng is not None else random.Random(config.seed)
    sampler = IndexSampler(n, config.batch_size * config.gradient_accumulate_steps, rng)
    micro = min(config.batch_size, n)
    lr0, mm_lr0 = config.resolved_lr, config.resolved_minmax_lr
    device_type, amp_dtype = torch.device(device).type, config.amp_dtype or torch.bfloat16
    token_scale = token_loss_scale(targets, loss_mask, config.massive_token_cap) if config.massive_token_cap > 0 else None
    groups = [(ps, lr) for ps, lr in ((round_params, lr0), (minmax_params, mm_lr0)) if ps]
    group_lrs = [lr for _, lr in groups]
    adam = torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in groups]) if config.enable_adam and groups else None

    for t in tunables.values():
        t.attach()
    best_loss, best_iter, first_loss = math.inf, 0, None
    best_params = None
    iters_run = 0
    try:
        for it in range(config.iters):
            for t in [*tunables.values(), *act_quant.values()]:
                t.clamp_()
            indices = sampler.next()
            total = 0.0
            count = len(indices) * targets[0].numel()
            if outlier_loss:  # the mean is over the elements left after each micro-batch's outliers
                count -= sum(outlier_count(len(indices[s : s + micro]) * targets[0].numel())
                             for s in range(0, len(indices), micro))
            for start in range(0, len(indices), micro):
                idx = indices[start : start + micro]
                with torch.autocast(device_type, dtype=amp_dtype, enabled=config.amp_dtype is not None):
                    out = run_block(idx)
                out = out.float()
                m = loss_mask[idx].to(out.device)
                if token_scale is not None:
                    m = m * token_scale[idx].to(out.device)
                diff = (out - targets[idx].to(out.device).float()) * m
                sq_sum = outlier_masked_sq_sum(diff, m) if outlier_loss else diff.pow(2).sum()
                loss = sq_sum / count  # summed over micro-batches = mean over the global batch
                loss.backward()
                total += loss.item()
            if first_loss is None:
                first_loss = total
            is_last = it == config.iters - 1
            if (not config.not_use_best_mse and total < best_loss) or (config.not_use_best_mse and is_last):
                best_loss, best_iter = total, it
                best_params = {name: t.snapshot() for name, t in tunables.items()}
                best_params.update({("act", n): q.max_scale.detach().clone() for n, q in act_quant.items()})
            iters_run = it + 1
            if on_iter is not None:
                on_iter(it, total)
            if config.dynamic_max_gap > 0 and it - best_iter >= config.dynamic_max_gap:
                break
            decay = 1.0 - it / config.iters  # LinearLR(1 -> 0): factor used at step `it`
            if adam is not None:
                for group, lr in zip(adam.param_groups, group_lrs):
                    group["lr"] = lr * decay
                adam.step()
                adam.zero_grad(set_to_none=True)
            else:
                _signed_step(round_params, lr0 * decay, config.momentum, buffers)
                _signed_step(minmax_params, mm_lr0 * decay, config.momentum, buffers)
    finally:
        for t in tunables.values():
            t.detach()
        end_sharing(act_quant, shared_inputs)
    if best_params:
        with torch.no_grad():
            for n, q in act_quant.items():
                q.max_scale.copy_(best_params[("act", n)])
    for q in act_quant.values():
        q.clamp_()
    results = {name: with_act_max(t.finalize(best_params[name] if best_params else None), act_quant.get(name))
               for name, t in tunables.items()}
    stats = BlockTuneStats(first_loss or 0.0, best_loss if best_params else math.nan, best_iter, iters_run)
    logger.info(
        "%s: quantized %d layers in the block, loss iter 0: %.6f -> iter %d: %.6f",
        block_name, len(tunables), stats.loss_first, stats.best_iter, stats.loss_best,
    )
    return results, stats


@torch.no_grad()
def rtn_block(
    layers: dict[str, tuple[nn.Module, QuantScheme]],
    *,
    scale_dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    act_max: Optional[dict[str, torch.Tensor]] = None,
    init_scales: Optional[dict[str, torch.Tensor]] = None,
    gscales: Optional[dict[str, torch.Tensor]] = None,
) -> dict[str, LayerQuantResult]:
    """Round-to-nearest: V = 0, alpha = beta = 1; writes the fake-quantized weights in place.

    GGUF layers use llama.cpp's quantizer without an imatrix (its scale search included). MX / NVFP4 / FP8
    layers take `init_scales` (the opt-RTN search's per-group multipliers) where given, NVFP4 layers the
    block's `gscales` (computed here when None). Activation quantizers are installed (static ones from
    `act_max`)."""
    ggml_layers = {n: l for n, l in layers.items() if l[1].gguf is not None}
    results: dict = gguf_rtn_block(ggml_layers, device=device) if ggml_layers else {}
    gscales = nvfp4_global_scales(layers) if gscales is None else gscales
    quantizers = install_act_quantizers(layers, act_max or {}, tune_clip=False, scale_dtype=scale_dtype)
    for name, (module, scheme) in layers.items():
        if name in ggml_layers:
            continue
        def quantize(rows: nn.Module, init: Optional[torch.Tensor], gscale: Optional[torch.Tensor], scheme=scheme,
                     fixed_range: Optional[tuple] = None):
            return make_tunable(rows, scheme, scale_dtype=scale_dtype, enable_minmax_tuning=False, device=device,
                                gscale=gscale, init_scale=init, fixed_range=fixed_range).finalize()

        result = rtn_in_slices(module, scheme, quantize, init_scale=(init_scales or {}).get(name),
                               gscale=gscales.get(name))
        results[name] = with_act_max(result, quantizers.get(name))
    return results
