"""`AutoRound`: the public entry point. Validates everything up front, then walks the blocks.

    ar = AutoRound("path/or/hub-id", scheme="W4A16")   # or AutoRound(model, tokenizer, ...)
    ar.quantize_and_save("./out", format="auto_round")

The block walks themselves (RTN / opt-RTN, SignRound) are in compressor_walk.py, the argument checks in
compressor_checks.py, the export checks in compressor_export.py, the AutoScheme step in compressor_autoscheme.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from .algorithms.autoscheme import AutoScheme
from .algorithms.act_quant import needs_act_calibration
from .algorithms.compile import act_qdq_kernels
from .algorithms.opt_rtn import uses_opt_rtn
from .algorithms.signround import SignRoundConfig
from .algorithms.tunable import LayerQuantResult
from .compressor_checks import (check_alg_ext_iters, check_cap, check_model_free_args, check_model_free_layers,
                                check_momentum, check_positive, keeps_alg_ext,
                                local_source_dir, resolve_batch_size, warn_mixed_fused)
from .compressor_export import SCALE_DTYPES, check_export, export_context
from .compressor_walk import quantize_embedding, quantize_outside_blocks, quantize_rtn, quantize_signround
from .export import BlockPacker, block_packer, export
from .model.blocks import iter_blocks
from .model.calib_batches import ids_from_batches
from .model.layer_config import LayerConfig, resolve_layer_schemes
from .model.scheme_recipes import expand_scheme_recipe, recipe_layer_config
from .model.dtype_convert import PendingConversion, lazy_embedding_name
from .model.checkpoint_config import ModelFreeError
from .model.loading import check_finite, load_model_deferred, load_model_free, parse_dtype
from .model.memory import freed_memory_reused, release_weight
from .model.packed_spill import PackedSpill, spill_dir_for
from .runtime import deterministic_algorithms, resolve_amp_dtype, resolve_device
from .model.gguf_plan import GGUFPlan, resolve_gguf_layers
from .model.setup import select_block_groups, shared_weight_ptrs, warn_unquantized_block_weights
from .model.source_dtypes import SourceDtypes, source_dtypes_of
from .schemes import QuantScheme, SchemeError, gguf_mix_of, resolve_scheme

logger = logging.getLogger("auto_round")
# set on a model object once quantize() starts changing its weights in place (see AutoRound._refuse_partial_model)
QUANTIZED_IN_PLACE_ATTR = "_auto_round_quantized_in_place"



class AutoRound:
    """Quantize a causal LM with SignRound (iters > 0) or round-to-nearest (iters == 0).

    model: a local directory, a hub id, or an nn.Module (then pass `tokenizer` too when iters > 0).
    scheme: preset name (W4A16, W2A16G64, ...), QuantScheme or dict; bits/group_size/sym override it.
        Or AutoScheme(avg_bits, options): mixed precision, one option per layer under a bit budget, chosen
        before quantization (a forward/backward on calibration text) and saved as autoscheme_plan.json.
    layer_config: {layer name or regex: {"bits": 8, ...} | scheme}; fp_layers: "name1,name2" kept fp.
    scheme "W4A16_MIXED" (the reference's MoE recipe): routed experts W4A16, every other layer W8A16 (shared
        experts included); layer_config entries win over it.
    dataset: None (pile-10k, or bundled offline Wikipedia text when the hub is unreachable), a local
        .txt/.json/.jsonl path, "a.json,b.jsonl:num=64", a list of strings, token ids [n, T] (LongTensor), or a
        torch DataLoader (or a list) of token batches (tensors, dicts with input_ids / attention_mask; model/calib_batches.py).
    low_cpu_mem_usage: in quantize_and_save with one packed format (not `fake`), pack each block's layers
        as soon as the block is done and release their weights (the source pages of a memory-mapped
        checkpoint too): the returned model then has meta weights in its quantized layers. quantize()
        alone never does this; pass False to keep the fake-quantized model after quantize_and_save. Also:
        a checkpoint stored in another dtype than model_dtype (bf16 files, fp32 on CPU) is loaded as stored
        and its blocks converted one by one as quantization reaches them, so until quantize() has run the
        blocks of `self.model` are still in the stored dtype; False converts the whole model at load.
    amp_attention: with amp on CPU, run attention in the amp dtype too (faster steps, slightly worse accuracy).
    enable_torch_compile: True: torch.compile the MX / NVFP4 activation qdq of the tuning forward
        (algorithms/compile.py; needs a C++ compiler on CPU, triton on CUDA): 3-20 % faster MX / NVFP4 steps
        in a one-block benchmark on CPU, none measured on a whole SmolLM2 run. None / False: eager (the default;
        the compiled gradient equals eager's only up to fp32 rounding, so the result's bytes differ).
    fp8_clip_tuning: also tune the clip (max_scale) of fp8 weights (FP8_STATIC / FP8_BLOCK / FPW8A16 and
        MXFP8), as the reference does (with enable_minmax_tuning). Off by default: an fp8 value's relative
        precision does not depend on the scale, so a smaller one only clips, and the signed steps drift it down on
        noise (SmolLM2 SignRound, held-out ppl: FP8_STATIC 19.591 tuned, 19.479 not; MXFP8 20.704 / 20.099;
        algorithms/signround.py::tunes_weight_clip). Static activation clips are tuned either way.
    enable_alg_ext: SignRoundV2 additions (algorithms/alg_ext.py): tuning starts from the opt-RTN scale search,
        max_scale in [0, 2], and below 4 bits / with 4-bit activations the top 0.1 % output errors are left out
        of the loss. Needs iters > 0 (ValueError) and a sym int, MXFP/MXINT or NVFP4 scheme (SchemeError for asym
        int / FP8); with a GGUF scheme it is a warned no-op (GGUF tuning already is its alg_ext variant); layers
        of other types (layer_config) are tuned as usual, with a warning.
    checkpoint / resume: quantize_and_save with iters > 0 checkpoints every tuned block in .<output_dir>.resume/
        (model/checkpoint_resume.py); resume=True continues from it (same bytes as an uninterrupted run), an
        existing one without resume (or overwrite) is an error; it is deleted after a successful save.
    enable_deterministic_algorithms: torch.use_deterministic_algorithms(True) while quantize() runs (restored
        after; on CUDA also a fixed cuBLAS workspace): an op with no deterministic implementation raises. Runs on
        CPU are reproducible without it (same seed, same bytes).
    num_hidden_layers: debugging on a big checkpoint: load (and quantize, export) only its first N blocks.
    disable_progress: no tqdm bars; run_report: write events.jsonl / report.md / PNGs (export/report.py).
    low_gpu_mem_usage: True (the default): the cached block inputs and outputs of the SignRound walk ([nsamples,
        seqlen, hidden] each, several of them) stay in host memory and each micro-batch is copied to the accelerator.
        False keeps them on the accelerator when the memory plan has room there beside the block's tuning (no copy
        per step; else they stay on the host, with a warning). The same results either way; nothing changes on CPU.
    memory_limit: bytes or "12GB" available to the tuning (default: the free host memory, or the free device
        memory on CUDA). Before tuning the predicted peak is logged (model/memory_plan.py); when it exceeds the
        limit and auto_adjust_memory, the micro-batch is halved with gradient_accumulate_steps doubled (same
        effective batch, slightly different numerics, logged); when nothing fits, MemoryPlanError. Before halving,
        MX / NVFP4 / FP8 weights switch to recompute_qdq, which does not change any result.
    recompute_qdq: MX / NVFP4 / FP8 SignRound rebuilds each layer's qdq graph in the backward pass instead of
        keeping it (bit-identical gradients; 3 bytes per weight less at the block's peak; +0-25 % time measured);
        off by default, switched on by the memory planner when the predicted peak does not fit otherwise.
    reuse_freed_memory: while quantize() runs, glibc's malloc keeps freed memory for the next step instead of
        unmapping it and page-faulting it in again (model/memory.py: ~10 % faster CPU tuning, the same peak RSS
        and results; the heap is still trimmed after each block). Blocks above 32 MiB (wider models' activations)
        are kept too while SignRound walks the blocks, when the memory plan has room for one more micro-batch of
        activations (~20 % faster steps there, +10-14 % peak RSS). Process-wide; no effect outside glibc.
    enable_adam: the reference's AdamRound (AutoRoundAdam): AdamW steps (torch's defaults) instead of signed ones, at
        the same learning rates and decay; 8 bytes per weight of the tuned block more.
    momentum: SignSGD momentum (the reference's `--momentum`, default 0): steps follow the sign of a momentum buffer
        of the gradients instead of the gradient's; one more fp32 value per weight of the block being tuned.
    model_free: plain RTN straight from the checkpoint's safetensors, without building the model
        (model/checkpoint_skeleton.py; the reference's `--model_free`): the layers are found from the tensor names,
        each block's tensors are read when it is quantized, and the export equals the regular RTN run's byte for
        byte. No transformers support for the architecture is needed. Needs iters=0 and plain RTN
        (disable_opt_rtn None or True; GGUF k-quants then search their scales without an imatrix), weight-only or
        dynamic-activation schemes, a model path.
    The remaining arguments are SignRound's (reference defaults).
    """

    def __init__(
        self,
        model: "str | nn.Module",
        tokenizer: Any = None,
        scheme: "str | QuantScheme | dict | AutoScheme" = "W4A16",
        *,
        bits: Optional[int] = None,
        group_size: Optional[int] = None,
        sym: Optional[bool] = None,
        data_type: Optional[str] = None,
        act_bits: Optional[int] = None,
        act_data_type: Optional[str] = None,
        act_group_size: Optional[int] = None,
        act_sym: Optional[bool] = None,
        act_dynamic: Optional[bool] = None,
        layer_config: Optional[LayerConfig] = None,
        fp_layers: "str | Sequence[str] | None" = None,
        quant_lm_head: bool = False,
        to_quant_block_names: "str | Sequence[str] | None" = None,
        dataset: Any = None,
        iters: int = 200,
        lr: Optional[float] = None,
        minmax_lr: Optional[float] = None,
        nsamples: int = 128,
        seqlen: int = 2048,
        batch_size: Optional[int] = None,
        gradient_accumulate_steps: int = 1,
        enable_minmax_tuning: bool = True,
        fp8_clip_tuning: bool = False,
        enable_quanted_input: bool = True,
        not_use_best_mse: bool = False,
        dynamic_max_gap: int = -1,
        seed: int = 42,
        momentum: float = 0.0,
        enable_adam: bool = False,
        enable_deterministic_algorithms: bool = False,
        disable_opt_rtn: Optional[bool] = None,
        enable_alg_ext: bool = False,
        massive_token_cap: float = 4.0,
        amp: Optional[bool] = None,
        amp_dtype: "str | torch.dtype" = "bf16",
        amp_attention: bool = False,
        enable_torch_compile: Optional[bool] = None,
        scale_dtype: "str | torch.dtype" = "fp16",
        model_dtype: "str | torch.dtype | None" = None,
        device: Optional[str] = None,
        device_map: Any = None,
        trust_remote_code: bool = True,
        max_shard_size: "int | str" = "5GB",
        low_cpu_mem_usage: bool = True,
        low_gpu_mem_usage: bool = True,
        num_hidden_layers: Optional[int] = None,
        model_free: bool = False,
        allow_pickle_checkpoint: bool = False,
        resume: bool = False,
        checkpoint: bool = True,
        disable_progress: bool = False,
        run_report: bool = True,
        memory_limit: "int | str | None" = None,
        auto_adjust_memory: bool = True,
        recompute_qdq: bool = False,
        reuse_freed_memory: bool = True,
    ):
        # AutoScheme: the layers start with its first option; the plan replaces them before quantization
        self.auto_scheme: Optional[AutoScheme] = scheme if isinstance(scheme, AutoScheme) else None
        self.auto_scheme_plans: Optional[list] = None
        # explicit fields win over the preset's (reference); act_group_size None = the weight group size
        overrides = dict(bits=bits, group_size=group_size, sym=sym, data_type=data_type, act_bits=act_bits,
                         act_data_type=act_data_type, act_group_size=act_group_size, act_sym=act_sym,
                         act_dynamic=act_dynamic)
        if self.auto_scheme is not None:
            from .compressor_autoscheme import check_auto_scheme_args

            check_auto_scheme_args(self.auto_scheme, overrides)
            # GGUF options: the layers start as the first option's llama.cpp mix (embedding / output types)
            auto = self.auto_scheme
            scheme = f"gguf:{auto.mixes[0]}" if auto.is_gguf else auto.schemes[0]
        scheme, recipe_layers = expand_scheme_recipe(scheme)  # W4A16_MIXED: W8A16 with routed experts at W4A16
        self.scheme = resolve_scheme(scheme, **overrides)
        check_positive(iters=iters, nsamples=nsamples, seqlen=seqlen, batch_size=8 if batch_size is None else batch_size,
                       gradient_accumulate_steps=gradient_accumulate_steps, allow_zero=("iters",))
        if isinstance(dataset, DataLoader) or (isinstance(dataset, (list, tuple)) and dataset and all(
                isinstance(x, (torch.Tensor, dict)) for x in dataset)):  # pre-tokenized batches -> ids [n, T]
            dataset = ids_from_batches(dataset, nsamples=nsamples, seqlen=seqlen)
        batch_size = resolve_batch_size(batch_size, nsamples=nsamples, iters=iters, dataset=dataset)
        self.device = resolve_device(device, device_map)
        if lr is None and iters >= 1000 and self.scheme.bits <= 3:
            lr = 2.0 / iters  # reference: long low-bit runs take a larger step
        self.scale_dtype = parse_dtype(scale_dtype)
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(f"scale_dtype must be fp16, bf16 or fp32, got {scale_dtype!r}")
        self.tuning = SignRoundConfig(
            iters=iters, lr=lr, minmax_lr=minmax_lr, batch_size=batch_size,
            gradient_accumulate_steps=gradient_accumulate_steps, enable_minmax_tuning=enable_minmax_tuning,
            not_use_best_mse=not_use_best_mse, dynamic_max_gap=dynamic_max_gap, seed=seed,
            amp_dtype=resolve_amp_dtype(amp, amp_dtype, self.device), enable_alg_ext=enable_alg_ext,
            massive_token_cap=check_cap(massive_token_cap), recompute_qdq=recompute_qdq,
            fp8_clip_tuning=fp8_clip_tuning, momentum=check_momentum(momentum, enable_adam), enable_adam=enable_adam,
        )
        check_alg_ext_iters(enable_alg_ext, iters)
        self.enable_quanted_input = enable_quanted_input
        self.amp_attention = amp_attention
        self.enable_torch_compile = enable_torch_compile
        # None = the reference default: opt-RTN on for iters=0 (sym int < 8 bits), off for W8 and asym
        self.disable_opt_rtn = disable_opt_rtn
        self.dataset, self.nsamples, self.seqlen, self.seed = dataset, nsamples, seqlen, seed
        self.enable_deterministic_algorithms = enable_deterministic_algorithms  # runtime.deterministic_algorithms
        self.max_shard_size = max_shard_size
        self.low_cpu_mem_usage, self.low_gpu_mem_usage = low_cpu_mem_usage, bool(low_gpu_mem_usage)
        self.reuse_freed_memory = reuse_freed_memory
        self.memory_limit, self.auto_adjust_memory = memory_limit, auto_adjust_memory  # model/memory_plan.py
        self._packer: Optional[BlockPacker] = None  # set by quantize_and_save for immediate packing
        self._spill: Optional[PackedSpill] = None  # where the packed blocks wait for the export (same)
        self.packed: dict[str, dict[str, torch.Tensor]] = {}
        self.source_dir = local_source_dir(model)  # never written to (see check_output_dir)
        self._pending: Optional[PendingConversion] = None
        self.source_dtypes: Optional[SourceDtypes] = None
        self.model_free = model_free
        if isinstance(model, nn.Module):
            if model_free:
                raise ModelFreeError("model_free reads the checkpoint's files: pass a model path, not a module")
            if num_hidden_layers is not None:
                raise ValueError("num_hidden_layers cuts a checkpoint while loading it: pass a model path, not a module")
            if getattr(model, QUANTIZED_IN_PLACE_ATTR, False):
                raise ValueError("this model object was already quantized in place by another AutoRound (its weights "
                                 "are fake-quantized, some or all of them): quantizing it again would quantize twice. "
                                 "Pass a freshly loaded model (or a copy.deepcopy taken before quantizing)")
            self.model, self.tokenizer = model, tokenizer
            check_finite(self.model)
        else:
            # low_cpu_mem_usage: a checkpoint stored in another dtype is converted block by block as the walk
            # reaches each block (model/dtype_convert.py); the rest of the model right after block discovery
            if model_free:  # the layers from the tensor names, each block's tensors read when it is quantized
                check_model_free_args(iters, disable_opt_rtn, num_hidden_layers, scheme)
                self.disable_opt_rtn = True
                self.model, loaded_tok, self._pending = load_model_free(
                    str(model), dtype=model_dtype, trust_remote_code=trust_remote_code, device=self.device)
            else:
                self.model, loaded_tok, self._pending = load_model_deferred(
                    str(model), dtype=model_dtype, trust_remote_code=trust_remote_code, device=self.device,
                    allow_pickle=allow_pickle_checkpoint, num_hidden_layers=num_hidden_layers,
                )
            self.tokenizer = tokenizer if tokenizer is not None else loaded_tok
            # the export writes unquantized tensors back in the checkpoint's dtypes, not the CPU's fp32 default
            # (an explicit model_dtype is the dtype asked for, and stays)
            self.source_dtypes = source_dtypes_of(str(model)) if model_dtype is None else None
            if self._pending is not None and not low_cpu_mem_usage:
                self._convert_pending()
        if self.auto_scheme is not None:
            from .compressor_autoscheme import check_auto_scheme_data

            check_auto_scheme_data(self.auto_scheme, self.tokenizer, dataset)
        if iters > 0 and self.tokenizer is None and not isinstance(dataset, torch.Tensor):
            raise ValueError("a tokenizer is needed to build calibration data (iters > 0); pass tokenizer=")
        self.block_groups = select_block_groups(self.model, to_quant_block_names)
        if self._pending is not None:  # everything but the blocks the walk converts one at a time (and the
            # token embedding, read only by the capture pass, which casts its output; converted after the walk)
            lazy = [name for name, _ in iter_blocks(self.model, self.block_groups)]
            lazy += [n for n in [lazy_embedding_name(self.model)] if n is not None]
            self._pending.convert(skip=tuple(lazy))
        layer_config = recipe_layer_config(recipe_layers, layer_config, self.model, self.block_groups)
        self._layer_choices = dict(layer_config=layer_config, fp_layers=fp_layers, quant_lm_head=quant_lm_head)
        self.gguf: Optional[GGUFPlan] = None
        self._resolve_layers(gguf_mix_of(scheme) if isinstance(scheme, str) else None)
        if model_free:
            check_model_free_layers(self.layer_schemes)
        self.results: dict[str, LayerQuantResult] = {}
        self.block_stats: dict[str, Any] = {}
        self.calibration_info: Optional[dict] = None  # hash of the calibration tokens, once built
        # the block walk's end for static-activation layers after the blocks (compressor_walk.TailChain)
        self._tail_chain: Optional[Any] = None
        self.quantized = False
        # per-block checkpoints of quantize_and_save's SignRound walk (model/checkpoint_resume.py)
        self.resume, self.checkpoint = resume, checkpoint
        self._ckpt: Optional[Any] = None
        self.disable_progress, self.run_report = disable_progress, run_report
        self.run_events: list[dict] = []  # run log of the SignRound walk (model/run_log.py)

    def _resolve_layers(self, gguf_mix: Optional[str]) -> None:
        """Every candidate layer's scheme; with a GGUF preset, llama.cpp's per-tensor types (model/gguf_plan.py)."""
        if gguf_mix is None:
            self.layer_schemes = resolve_layer_schemes(self.model, self.block_groups, self.scheme, **self._layer_choices)
            if self.auto_scheme is None:  # an AutoScheme plan is checked when it is made (share_fused_layers)
                warn_mixed_fused(self.layer_schemes)
        else:
            has_imatrix = self.tuning.iters > 0 or not self.disable_opt_rtn
            self.gguf = resolve_gguf_layers(self.model, self.block_groups, gguf_mix, self.scheme, self._layer_choices,
                                            has_imatrix=has_imatrix)
            self.layer_schemes = self.gguf.layer_schemes
            if self.gguf.is_float:
                return  # gguf:bf16 / f16 / f32: nothing to quantize, the writer converts
        warn_unquantized_block_weights(self.model, self.block_groups, list(self.layer_schemes))
        n_quant = sum(s.is_quantized for s in self.layer_schemes.values())
        if n_quant == 0:
            raise SchemeError("no layer would be quantized with these settings (all fp or skipped by shape)")
        if self.tuning.enable_alg_ext and not keeps_alg_ext(self.scheme, self.layer_schemes, self.block_groups):
            self.tuning = dataclasses.replace(self.tuning, enable_alg_ext=False)

    # ------------------------------------------------------------------------------------------
    def quantize(self) -> tuple[nn.Module, dict[str, LayerQuantResult]]:
        """Quantize in place (weights become their fake-quantized values). Returns (model, results)."""
        if self.quantized:
            return self.model, self.results
        self._refuse_partial_model()
        start = time.perf_counter()
        with freed_memory_reused(self.reuse_freed_memory), \
                deterministic_algorithms(self.enable_deterministic_algorithms, self.device):
            self._quantize_in_place()
        self.quantized = True
        logger.info("quantization done in %.1f s (%d layers)", time.perf_counter() - start, len(self.results))
        return self.model, self.results

    def _quantize_in_place(self) -> None:
        """The AutoScheme plan if any, then every layer (blocks, embedding, outside the blocks), in place."""
        if self.auto_scheme is not None:
            self._convert_pending()  # the scoring runs every block
        self._plan_auto_scheme()
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # from here on the weights are quantized in place, block by block: a second quantize() of this object
        # (_refuse_partial_model) and another AutoRound given this model object refuse it
        setattr(self.model, QUANTIZED_IN_PLACE_ATTR, True)
        quantize_embedding(self)
        if any(s.is_quantized for s in self.layer_schemes.values()):  # gguf:bf16 / f16 / f32: no layer, no walk
            if self.tuning.iters == 0:
                quantize_rtn(self)
            else:
                quantize_signround(self)
            quantize_outside_blocks(self)
        self._convert_pending()  # blocks outside the walk (other block groups) too

    def _refuse_partial_model(self) -> None:
        """A quantize() that stopped half-way (an error, Ctrl-C) left some blocks quantized in place: running
        again would take their quantized weights for the fp model and quantize them a second time."""
        if getattr(self.model, QUANTIZED_IN_PLACE_ATTR, False) and not self.quantized:
            done = [n for n in self.block_stats] or ["none of the blocks yet (the embedding or RTN pass)"]
            raise RuntimeError(
                "an earlier quantize() of this AutoRound stopped after changing the model's weights in place "
                f"(blocks finished: {', '.join(done[:3])}{' ...' if len(done) > 3 else ''}); quantizing again would "
                "quantize those weights twice. Create a new AutoRound from the original model (a model passed as an "
                "nn.Module was changed too: load it again); a quantize_and_save run that stopped continues from its "
                "checkpoint with resume=True (CLI: --resume)")

    def _convert_pending(self) -> None:
        if self._pending is not None:
            self._pending.convert()
            self._pending = None

    def _plan_auto_scheme(self) -> None:
        if self.auto_scheme is None or self.auto_scheme_plans is not None:
            return
        from .compressor_autoscheme import plan_layers

        self.auto_scheme_plans = plan_layers(self)

    def _block_layers(self, block_name: str) -> dict[str, tuple[nn.Module, QuantScheme]]:
        prefix = block_name + "."
        return {
            n: (self.model.get_submodule(n), s)
            for n, s in self.layer_schemes.items()
            if n.startswith(prefix) and s.is_quantized
        }

    def _wants_opt_rtn(self) -> bool:
        if self.disable_opt_rtn or not any(uses_opt_rtn(s) for s in self.layer_schemes.values()):
            return False
        if self.tokenizer is None and not isinstance(self.dataset, torch.Tensor):
            if self.disable_opt_rtn is None:
                logger.warning("opt-RTN (the iters=0 default) needs calibration data: no tokenizer and no token ids "
                               "were given, so weights are rounded to nearest; pass disable_opt_rtn=True to silence")
                return False
            raise ValueError("disable_opt_rtn=False needs calibration data: pass a tokenizer or a tensor dataset")
        return True

    def _needs_act_calibration(self) -> bool:
        return any(needs_act_calibration(s) for s in self.layer_schemes.values())

    def _block_done(self, block_name: str) -> None:
        """Immediate packing: pack the finished block's quantized layers now and release their weights.

        Runs once nothing reads the block's weights any more (its outputs for the next block are computed).
        """
        if self._packer is None:
            return
        shared = shared_weight_ptrs(self.model)
        fresh = {}
        for name, (module, _) in self._block_layers(block_name).items():
            fresh[name] = self._packer.pack(name, self.results[name])
            self.results[name] = dataclasses.replace(self.results[name], codes=None)
            if module.weight.data_ptr() not in shared:  # a weight another module uses stays
                release_weight(module)
        # on disk until the export reads them (model/packed_spill.py), else in memory
        self.packed.update(self._spill.put(fresh) if self._spill is not None else fresh)

    def _compile_act_qdq(self) -> bool:
        """Whether the tuning forward's MX / NVFP4 activation qdq runs torch.compile'd (algorithms/compile.py)."""
        schemes = [s for name, _ in iter_blocks(self.model, self.block_groups)
                   for _, s in self._block_layers(name).values()]
        return act_qdq_kernels(self.enable_torch_compile, device=self.device, schemes=schemes) is not None

    def _settings(self) -> dict:
        return {"scheme": self.scheme.to_dict(), "seed": self.seed, "nsamples": self.nsamples, "seqlen": self.seqlen,
                **{k: str(v) for k, v in dataclasses.asdict(self.tuning).items()}}

    def save_quantized(self, output_dir: "str | Path", format: Optional[str] = None, overwrite: bool = False) -> list[Path]:
        """Export the quantized model (quantizing first if needed); several comma-separated formats go to
        output_dir/<format>. format None: auto_round, or the GGUF file of a gguf:* scheme."""
        _, targets, _ = check_export(self, output_dir, format, overwrite)
        if not self.quantized:
            self.quantize()
        ctx = export_context(self)
        return [export(ctx, d, fmt, overwrite=overwrite) for fmt, d in targets.items()]

    def quantize_and_save(self, output_dir: "str | Path" = "./tmp_autoround", format: Optional[str] = None,
                          overwrite: bool = False) -> tuple[nn.Module, list[Path]]:
        """Validate the output first (fail before minutes of tuning), quantize, export. format None: auto_round,
        or the GGUF file of a gguf:* scheme (GGUF AutoScheme options: the first option's mix), as in the reference.

        With one format and low_cpu_mem_usage, layers are packed block by block (see the class docstring).
        """
        if not self.quantized:
            self._refuse_partial_model()  # before the output checks, which may remove a resumable checkpoint
        formats, _, layers = check_export(self, output_dir, format, overwrite)
        if self.tuning.iters > 0 and self.checkpoint and not self.quantized:
            from .model.resume_hook import RunCheckpoint

            self._ckpt = RunCheckpoint.start(self, output_dir, overwrite)
        if self.low_cpu_mem_usage and len(formats) == 1 and not self.quantized:
            quantized = {n: v for n, v in layers.items() if v[0].is_quantized}
            self._packer = block_packer(formats[0], quantized, SCALE_DTYPES[self.scale_dtype])
            self._spill = PackedSpill.start(spill_dir_for(output_dir))
        try:
            try:
                self.quantize()
            finally:
                if self._ckpt is not None:
                    self._ckpt.restore_sigint()  # Ctrl-C is deferred only during the block walk
            paths = self.save_quantized(output_dir, format=format, overwrite=overwrite)
        finally:
            if self._spill is not None:  # written or failed: the work files go (the maps stay readable)
                self._spill.remove()
                self._spill = None
        if self.run_report:
            from .export.report import write_run_reports

            write_run_reports(paths, self.run_events)
        if self._ckpt is not None:
            self._ckpt.remove()  # the artifact is complete: the work directory is not needed any more
        return self.model, paths
