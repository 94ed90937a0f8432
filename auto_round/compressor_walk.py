"""AutoRound's block walks: RTN / opt-RTN and SignRound, and the calibration set they read.

Kept out of compressor.py (which validates the arguments and orchestrates quantize / save); each function
takes the `AutoRound` whose model, layer schemes and results it reads and fills.

SignRound (iters > 0): capture every block's inputs once; then for block i
    targets_i = block_i(fp_in_i)                    fp chain (weights not yet quantized)
    tune block_i on q_in_i against targets_i        q_in_0 = fp_in_0
    q_in_{i+1} = block_i(q_in_i) (quantized)        fp_in_{i+1} = targets_i
With iters == 0 the layers are rounded to nearest, with no data and no forward pass (opt-RTN and static
activation ranges walk the fp chain only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from .algorithms.act_quant import act_max_hooks, needs_act_calibration
from .algorithms.alg_ext import supports_alg_ext
from .algorithms.gguf import gguf_quantize_module
from .algorithms.opt_rtn import imatrix_hooks, opt_rtn_block
from .algorithms.signround import loss_mask_from_attention, rtn_block, tune_block
from .model.block_inputs import BlockCall, capture_block_inputs
from .model.block_run import block_runner, run_batched
from .model.blocks import iter_blocks
from .model.memory import large_blocks_reused, release_memory
from .model.memory_plan import plan_signround_memory
from .model.run_log import RunLog, relative_errors, weight_snapshot
from .model.setup import clamp_seqlen
from .model.tail_inputs import outside_input_max
from .model.tuning_attention import tuning_attention

if TYPE_CHECKING:
    from .compressor import AutoRound

logger = logging.getLogger("auto_round")


def quantize_rtn(ar: "AutoRound") -> None:
    """iters=0: every block's layers rounded to nearest, or opt-RTN / static activation ranges when they
    need calibration data."""
    if ar._wants_opt_rtn() or ar._needs_act_calibration():
        quantize_opt_rtn(ar, search=ar._wants_opt_rtn())
        return
    for name, block in iter_blocks(ar.model, ar.block_groups):
        if ar._pending is not None:
            ar._pending.convert(name)
        layers = ar._block_layers(name)
        if layers:
            ar.results.update(rtn_block(layers, scale_dtype=ar.scale_dtype, device=ar.device))
        ar._block_done(name)
        # the qdq temporaries fragment the heap between the packed tensors; they are freed by refcount (no gc)
        release_memory(ar.device, collect=False)
    logger.info("RTN: rounded %d layers to nearest (iters=0)", len(ar.results))


def quantize_opt_rtn(ar: "AutoRound", search: bool = True) -> None:
    """imatrix (and static activation ranges) from each block's fp inputs, then a per-group scale search
    (algorithms/opt_rtn.py); search=False: plain RTN, data only for the static activation ranges."""
    # no autograd here, so no reference cycles: refcount frees each block's temporaries (collect=False)
    calib = calibration_set(ar)
    fp_in, steps = walk_blocks(ar, calib, "opt-RTN" if search else "activation calibration", collect=False)
    call = None
    for name, block, call in steps:
        layers = ar._block_layers(name)
        with imatrix_hooks(layers if search else {}) as imatrix, act_max_hooks(layers) as act_max:
            fp_out = run_batched(block, fp_in, call, ar.tuning.batch_size, ar.device)
        if layers:
            ar.results.update(opt_rtn_block(layers, imatrix, scale_dtype=ar.scale_dtype, device=ar.device,
                                            act_max=act_max))
        fp_in = fp_out
    keep_tail_chain(ar, calib, fp_in, call)
    if search:
        logger.info("opt-RTN: %d layers quantized with imatrix-weighted scale search (iters=0)", len(ar.results))
    else:
        logger.info("RTN: %d layers rounded to nearest, static activation ranges calibrated", len(ar.results))


def outside_layers(ar: "AutoRound") -> dict[str, tuple[nn.Module, Any]]:
    """Quantized layers outside the blocks not quantized yet (lm_head with quant_lm_head)."""
    return {
        n: (ar.model.get_submodule(n), s)
        for n, s in ar.layer_schemes.items()
        if s.is_quantized and n not in ar.results and not any(n.startswith(g + ".") for g in ar.block_groups)
    }


@dataclasses.dataclass
class TailChain:
    """The end of a block walk, kept for static activation ranges of the layers after the blocks: the last
    block's fp outputs h_last [n, T, H], the calibration ids / mask [n, T] and the last block's call."""

    h_last: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    call: BlockCall


def keep_tail_chain(ar: "AutoRound", calib: Any, h_last: torch.Tensor, call: "BlockCall | None") -> None:
    """Keep the walk's end (TailChain) when a layer outside the blocks needs static activation ranges."""
    if call is not None and any(needs_act_calibration(s) for _, s in outside_layers(ar).values()):
        ar._tail_chain = TailChain(h_last, calib.input_ids, calib.attention_mask, call)


def quantize_outside_blocks(ar: "AutoRound") -> None:
    """Layers outside the blocks (lm_head with quant_lm_head) are rounded to nearest; static activation
    ranges come from the model's tail run on the walk's last fp outputs (model/tail_inputs.py)."""
    outside = outside_layers(ar)
    tail, ar._tail_chain = ar._tail_chain, None
    if not outside:
        return
    act_max = {}
    if tail is not None:
        blocks = [b for _, b in iter_blocks(ar.model, ar.block_groups)]
        act_max = outside_input_max(ar.model, blocks, tail.call.output_is_tuple, tail.h_last, tail.input_ids, tail.attention_mask,
                                    outside, batch=ar.tuning.batch_size, device=ar.device)
    logger.info("rounding %d layer(s) outside the blocks to nearest: %s", len(outside), ", ".join(outside))
    ar.results.update(rtn_block(outside, scale_dtype=ar.scale_dtype, device=ar.device, act_max=act_max))


def quantize_embedding(ar: "AutoRound") -> None:
    """GGUF quantizes the token embedding (llama.cpp's search, no imatrix), before any block input is
    captured, so the blocks are tuned on what the GGUF model will feed them."""
    if ar.gguf is None or ar.gguf.embedding is None or not ar.gguf.embedding[1].is_quantized:
        return
    name, scheme = ar.gguf.embedding
    if ar._pending is not None:
        ar._pending.convert(name)  # quantized from the converted table, as without deferral
    ar.results[name] = gguf_quantize_module(ar.model.get_submodule(name), scheme, device=ar.device)
    logger.info("%s (token embedding) quantized to %s", name, scheme.gguf)


def calibration_set(ar: "AutoRound") -> Any:
    if isinstance(ar.dataset, torch.Tensor):  # pre-tokenized [n, T] ids: used as given
        ids = ar.dataset.long()
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"a tensor dataset must be non-empty token ids [n, seqlen], got shape {tuple(ids.shape)}")
        calib = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids),
                                description=f"{ids.shape[0]} pre-tokenized samples")
        ar.calibration_info = calibration_fingerprint(ids, calib.attention_mask, calib.description)
        return calib
    from .model.calib_data import CalibrationDataError, build_calibration_set

    seqlen = clamp_seqlen(ar.seqlen, ar.model, ar.tokenizer)
    calib = build_calibration_set(ar.tokenizer, ar.dataset, seqlen=seqlen, nsamples=ar.nsamples, seed=ar.seed)
    logger.info("calibration: %d samples x %d tokens from %s", *calib.input_ids.shape, calib.description)
    real = int(calib.attention_mask.sum())
    if real < seqlen:  # not one full sample: tuning/statistics on mostly padding would be meaningless
        raise CalibrationDataError(
            f"the calibration data ({calib.description}) holds {real} tokens, fewer than seqlen={seqlen}: not "
            f"even one full sample; give more text or a smaller seqlen (CLI: --seqlen)")
    ar.calibration_info = calibration_fingerprint(calib.input_ids, calib.attention_mask, calib.description)
    return calib


def walk_blocks(ar: "AutoRound", calib: Any, what: str, collect: bool = True,
                chain_device: "torch.device | str" = "cpu") -> tuple[torch.Tensor, Iterator[tuple[str, nn.Module, BlockCall]]]:
    """Capture every block's inputs once; returns (first block's hidden states [n, T, H], steps).

    chain_device: where the captured inputs (and so every chain computed from them) are kept: the CPU, or the
    tuning device when the memory plan has room there (low_gpu_mem_usage=False).

    Each step yields (name, block, call) with the block on the tuning device; after the step the block
    goes back to the CPU (one block at a time on an accelerator) and freed memory is released (with a full
    gc.collect unless collect=False, see release_memory).
    """
    if len(ar.block_groups) != 1:
        raise NotImplementedError(
            f"{what} over several block groups ({ar.block_groups}) is not supported yet; "
            "pass to_quant_block_names with one of them"
        )
    blocks = list(iter_blocks(ar.model, ar.block_groups))
    captured = capture_block_inputs(
        ar.model, [b for _, b in blocks], calib.input_ids, calib.attention_mask, device=ar.device,
        store_device=chain_device, embedding_dtype=ar._pending.wanted if ar._pending is not None else None,
    )
    calls = captured.calls  # the steps must not keep `captured`: it holds the first block's inputs [n, T, H]

    def steps() -> Iterator[tuple[str, nn.Module, BlockCall]]:
        for (name, block), call in zip(blocks, calls):
            if ar._pending is not None:
                ar._pending.convert(name)
            block.to(ar.device)
            yield name, block, call
            if ar.device != "cpu":
                block.to("cpu")
            ar._block_done(name)
            release_memory(ar.device, collect=collect)

    return captured.hidden_states, steps()


def quantize_signround(ar: "AutoRound") -> None:
    """iters > 0: tune block by block (see the module docstring); results and per-block stats go to `ar`."""
    calib = calibration_set(ar)
    ar.tuning, roomy, chains_on_device = plan_signround_memory(  # logs the predicted peak; a smaller micro-batch
        ar.model, ar.layer_schemes, list(iter_blocks(ar.model, ar.block_groups)), ar.tuning,  # or an error if too big
        nsamples=calib.input_ids.shape[0], seqlen=calib.input_ids.shape[1], device=ar.device,
        enable_quanted_input=ar.enable_quanted_input, memory_limit=ar.memory_limit,
        auto_adjust=ar.auto_adjust_memory, low_gpu_mem_usage=ar.low_gpu_mem_usage)
    ar.tuning = dataclasses.replace(ar.tuning, compile_act_qdq=ar._compile_act_qdq())
    chain_device = ar.device if chains_on_device else "cpu"
    fp_in, steps = walk_blocks(ar, calib, "SignRound", chain_device=chain_device)
    loss_mask = loss_mask_from_attention(calib.attention_mask)
    batch_order = random.Random(ar.tuning.seed)  # one stream through all blocks (see IndexSampler)
    q_in, last_call = None, None
    ckpt = ar._ckpt.bind(ar.calibration_info) if ar._ckpt is not None else None
    done = ckpt.restore(ar, batch_order) if ckpt is not None else None
    if done is not None:  # (read back on the CPU)
        fp_in, q_in = done.fp_in.to(chain_device), (done.q_in.to(chain_device) if done.q_in is not None else None)
    log = RunLog(sum(1 for _ in iter_blocks(ar.model, ar.block_groups)), ar._settings(),
                 ar.disable_progress, done.extra.get("events") if done is not None else None)
    if ar.reuse_freed_memory and not roomy:
        logger.info("memory: freed blocks above 32 MiB go back to the OS at once (keeping them, ~20 %% faster steps "
                    "on wide models, needs one more micro-batch of activations than the predicted peak)")
    # (the loop stays in this function: a helper's caller would keep the first block's inputs alive throughout)
    with large_blocks_reused(ar.reuse_freed_memory and roomy):
        for name, block, call in steps:
            if done is not None and name in done.done:
                log.skip()
                continue  # results and weights restored; walk_blocks still packs the block
            log.block_start(name, ar.tuning.iters)
            layers = ar._block_layers(name)
            before = weight_snapshot(layers)
            # GGUF layers (and alg_ext ones) search their scales with the imatrix of their fp inputs before tuning V
            searched = {n: v for n, v in layers.items()
                        if v[1].gguf is not None or (ar.tuning.enable_alg_ext and supports_alg_ext(v[1]))}
            with imatrix_hooks(searched) as imatrix, act_max_hooks(layers) as act_max:
                targets = run_batched(block, fp_in, call, ar.tuning.batch_size, ar.device)
            tune_in = q_in if (ar.enable_quanted_input and q_in is not None) else fp_in
            if tune_in is not fp_in:
                fp_in = None  # the targets carry the fp chain on; its input is not read again (one chain less)
            if layers:
                run = block_runner(block, tune_in, call, ar.device)
                # opt-in: attention in the autocast dtype too (model/tuning_attention.py; ~8 % faster steps on
                # CPU, but W2 perplexity on SmolLM2 went 75.8 -> 77.8, so it is not the default)
                with tuning_attention(block, enabled=ar.amp_attention and ar.tuning.amp_dtype is not None):
                    results, stats = tune_block(
                        layers, run, targets, loss_mask, ar.tuning,
                        scale_dtype=ar.scale_dtype, device=ar.device, block_name=name, imatrix=imatrix,
                        rng=batch_order, act_max=act_max, on_iter=log.on_iter,
                    )
                ar.results.update(results)
                ar.block_stats[name] = stats
            q_in = (run_batched(block, tune_in, call, ar.tuning.batch_size, ar.device)
                    if ar.enable_quanted_input else None)
            fp_in = targets
            last_call = call
            st = ar.block_stats.get(name)
            steps_run = (st.iters_run if st else 0) * ar.tuning.gradient_accumulate_steps
            tokens = steps_run * ar.tuning.batch_size * fp_in.shape[1]
            log.block_done(name, st, tokens, relative_errors(layers, before))
            if ckpt is not None:
                ckpt.save(ar, name, layers, fp_in, q_in, batch_order, extra={"events": log.events})
    log.end()
    ar.run_events = log.events
    keep_tail_chain(ar, calib, fp_in, last_call)


def calibration_fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor, description: str) -> dict:
    """SHA-256 of the calibration token ids and mask (int64 bytes, row-major): equal hashes = equal data."""
    digest = hashlib.sha256()
    for t in (input_ids, attention_mask):
        digest.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return {"sha256": digest.hexdigest(), "samples": int(input_ids.shape[0]), "seqlen": int(input_ids.shape[1]),
            "source": description}
