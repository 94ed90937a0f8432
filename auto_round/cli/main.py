"""Command line: `auto-round`, `auto-round-best`, `auto-round-light`, `auto-round-rtn` (evaluation:
`--tasks` after quantization, `--eval` / `auto-round eval` / `auto-round-eval` alone, see eval_cmd).

Recipes fill only the settings the user left unset (reference behaviour):
    default: iters 200,  nsamples 128, seqlen 2048, batch_size 8 (at most nsamples), lr 1/iters
    best:    iters 1000, nsamples 512                             (lr 2/iters for <= 3 bits)
    light:   iters 50,                                lr 5e-3
    rtn:     iters 0,    nsamples 1,                          plain round-to-nearest (opt-RTN off)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from .eval_cmd import add_eval_args, check_tasks, evaluate_after_quantize

RECIPES = {
    "default": {"iters": 200, "nsamples": 128, "seqlen": 2048, "lr": None},
    "best": {"iters": 1000, "nsamples": 512, "seqlen": 2048, "lr": None},
    "light": {"iters": 50, "nsamples": 128, "seqlen": 2048, "lr": 5e-3},
    "rtn": {"iters": 0, "nsamples": 1, "seqlen": 2048, "lr": None, "disable_opt_rtn": True},
}



def _switch(parent: "argparse._ActionsContainer", dest: str, default: Optional[bool], *, on: Sequence[str],
            off: Sequence[str], on_help: str, off_help: str) -> None:
    """Two exclusive flags setting `dest` to True (`on`) or False (`off`); `default` when neither is given."""
    group = parent.add_mutually_exclusive_group()
    group.add_argument(*on, dest=dest, action="store_true", default=default, help=on_help)
    group.add_argument(*off, dest=dest, action="store_false", help=off_help)

def build_parser(prog: str = "auto-round") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Quantize a causal LM with SignRound and export it.")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model directory or hub id")
    p.add_argument("--model", "--model_name", "--model_name_or_path", dest="model", help="model directory or hub id")
    s = p.add_argument_group("scheme")
    s.add_argument("--scheme", help="preset: W2A16..W8A16, W*A16G64, W*A16G32, gguf:q4_k_m, ... (default W4A16, "
                                     "or the format's when --format is a gguf:* preset); W4A16_MIXED: routed MoE "
                                     "experts W4A16, the rest W8A16")
    s.add_argument("--bits", "--bit", type=_bits_value,
                   help="weight bits (overrides the scheme); with --schemes the target average bits, e.g. 3.0")
    s.add_argument("--group_size", type=int, help="group size along in_features; -1 per channel, 0 per tensor")
    s.add_argument("--asym", action="store_true", help="asymmetric quantization (integer zero point)")
    s.add_argument("--data_type", "--dtype", help="weight data type (int)")
    s.add_argument("--act_bits", type=int, help="activation bits (overrides the scheme; 16 = not quantized)")
    s.add_argument("--act_group_size", type=int, help="activation group size; -1 per token, 0 per tensor "
                                                      "(default: the weight group size)")
    s.add_argument("--act_asym", action="store_true", help="asymmetric activation quantization")
    s.add_argument("--act_data_type", "--act_dtype", help="activation data type (int, fp, mx_fp, ...)")
    s.add_argument("--disable_act_dynamic", action="store_true",
                   help="static activation quantization: input ranges calibrated on the calibration data")
    s.add_argument("--scale_dtype", default="fp16", choices=["fp16", "float16", "bf16", "bfloat16", "fp32", "float32"])
    s.add_argument("--layer_config", help='JSON: {"layer name or regex": {"bits": 8}, ...}')
    s.add_argument("--fp_layers", "--ignore_layers", help="comma list of layers kept in fp ('layers.1' = that block)")
    s.add_argument("--quant_lm_head", action="store_true", help="also quantize lm_head (not when tied)")
    s.add_argument("--to_quant_block_names", help="comma list of block ModuleLists to quantize")
    a = p.add_argument_group("AutoScheme (mixed bits: one option per layer under an average-bits budget)")
    a.add_argument("--schemes", "--options", dest="schemes",
                   help="candidate schemes, comma-separated, e.g. W2A16G64,W4A16G64, or gguf:q2_k_s,gguf:q4_k_m "
                        "for a mixed GGUF file (not with --scheme)")
    a.add_argument("--avg_bits", "--target_bits", dest="avg_bits",
                   help="target average bits (or --bits); a comma list gives one plan per target, the first is used")
    a.add_argument("--ignore_scale_zp_bits", action="store_true", help="count b bits per weight, not scales/zero points")
    a.add_argument("--shared_layers", action="append",
                   help="comma list of patterns whose layers share one option in each block (repeatable); "
                        "MoE experts always share; q/k/v and gate/up do unless --no_share_fused_layers")
    a.add_argument("--no_share_fused_layers", dest="share_fused_layers", action="store_false", default=None,
                   help="let q/k/v and gate/up take different options: a better plan at the same bits, but "
                        "runtimes that fuse them (vLLM) cannot load the checkpoint; transformers can (gguf:* "
                        "options never share: llama.cpp keeps them as separate tensors)")
    a.add_argument("--auto_scheme_nsamples", type=int, default=16, help="calibration samples of the scoring")
    a.add_argument("--auto_scheme_seqlen", type=int, default=256, help="tokens per sample of the scoring")
    a.add_argument("--auto_scheme_batch_size", type=int, help="samples per scoring pass (default min(8, nsamples))")
    a.add_argument("--auto_scheme_score", choices=("fisher", "delta_loss"), default="fisher",
                   help="layer sensitivity: fisher (default; squared error weighted by the per-sample squared "
                        "gradient at the fp weights, one pass for all options) or delta_loss (the reference's "
                        "first-order score, gradient of the model with every layer quantized by the option)")
    t = p.add_argument_group("tuning")
    t.add_argument("--iters", "--iter", type=int, help="SignRound iterations per block; 0 = RTN")
    t.add_argument("--lr", type=float, help="rounding learning rate (default 1/iters)")
    t.add_argument("--minmax_lr", type=float, help="clip-scale learning rate (default lr)")
    t.add_argument("--nsamples", "--nsample", type=int, help="calibration samples")
    t.add_argument("--seqlen", "--seq_len", type=int, help="tokens per calibration sample")
    t.add_argument("--batch_size", "--train_bs", "--bs", type=int, help="samples per step")
    t.add_argument("--gradient_accumulate_steps", type=int, default=1)
    t.add_argument("--dataset", help="local .txt/.json/.jsonl, hub name, or 'a.json,b.jsonl:num=64'")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--momentum", type=float, default=0.0,
                   help="SignSGD momentum in [0, 1): steps follow the sign of a momentum buffer (default 0)")
    t.add_argument("--enable_adam", action="store_true",
                   help="AdamRound: tune with AdamW (torch defaults) instead of signed steps, same lr and decay")
    t.add_argument("--enable_deterministic_algorithms", action="store_true",
                   help="torch.use_deterministic_algorithms while quantizing: an op with no deterministic "
                        "implementation fails instead of running (CPU runs are reproducible without it)")
    _switch(t, "disable_minmax_tuning", False, on=("--disable_minmax_tuning", "--no-enable_minmax_tuning"),
            off=("--enable_minmax_tuning",),
            on_help="tune rounding only, not clip scales",
            off_help="tune the clip scales too (the default; the reference's spelling)")
    t.add_argument("--enable_fp8_clip_tuning", action="store_true",
                   help="also tune the clip scales of fp8 weights (FP8_*, MXFP8), as the reference does (off: with "
                        "fp8 a smaller scale only clips; measured worse on held-out text)")
    _switch(t, "disable_quanted_input", False, on=("--disable_quanted_input", "--no-enable_quanted_input"),
            off=("--enable_quanted_input",),
            on_help="tune on fp-chain inputs",
            off_help="tune each block on the previous quantized blocks' outputs (the default)")
    t.add_argument("--not_use_best_mse", action="store_true", help="keep the last iteration, not the best")
    _switch(t, "disable_opt_rtn", None, on=("--disable_opt_rtn",), off=("--enable_opt_rtn",),
            on_help="iters 0: plain round-to-nearest instead of the imatrix-weighted scale search",
            off_help="iters 0: force the opt-RTN scale search (default for sym int below 8 bits)")
    t.add_argument("--enable_alg_ext", action="store_true",
                   help="SignRoundV2 additions (iters > 0; sym int, MXFP4/MXFP8, NVFP4): start from the opt-RTN "
                        "imatrix scale search, clip scales in [0, 2], and below 4 bits or with 4-bit activations "
                        "leave the top 0.1%% output errors out of the loss")
    t.add_argument("--massive_token_cap", type=float, default=4.0,
                   help="tokens whose fp block output norm is more than this many times the median token norm "
                        "(attention sinks with massive activations) count in the loss with their relative error at "
                        "that norm (default 4); 0 = the reference's plain MSE")
    _switch(t, "amp", None, on=("--amp",), off=("--disable_amp",),
            on_help="run the tuning matmuls in --amp_dtype (torch.autocast; targets stay full precision). "
            "Default: on where bf16 is fast (CUDA, CPUs with AVX512-BF16/AMX)",
            off_help="tune in the model's dtype")
    t.add_argument("--amp_dtype", default="bf16", choices=["bf16", "bfloat16", "fp16", "float16"])
    t.add_argument("--amp_attention", action="store_true",
                   help="with --amp on CPU, also run attention in the amp dtype: ~8%% faster tuning steps, "
                        "slightly worse accuracy (SmolLM2 W2A16G64: ppl 77.8 instead of 75.8)")
    _switch(t, "enable_torch_compile", None, on=("--enable_torch_compile",), off=("--disable_torch_compile",),
            on_help="torch.compile the MX / NVFP4 activation qdq of the tuning forward (needs a C++ compiler "
            "on CPU, triton on CUDA). Off by default: on CPU a one-block step got 3-20 %% faster but a whole "
            "SmolLM2 run did not, and its gradient equals eager's only up to fp32 rounding",
            off_help="never compile (eager activation qdq; the default)")
    r = p.add_argument_group("runtime and output")
    r.add_argument("--device", "--device_map", dest="device", help="cpu, cuda, cuda:0, ... (default: cuda if present)")
    r.add_argument("--model_dtype", help="fp32 / fp16 / bf16 (default fp32 on CPU)")
    r.add_argument("--num_hidden_layers", "--debug_layer_num", type=int,
                   help="debugging: load, quantize and export only the model's first N layers")
    _switch(r, "model_free", False, on=("--model_free",), off=("--disable_model_free",),
            on_help="plain RTN (--iters 0) straight from the checkpoint's safetensors, without building the "
            "model: layers found from the tensor names, blocks read one at a time, the same export "
            "as the regular RTN run; needs no transformers support for the architecture",
            off_help="build the model (the default here; the reference's flag, accepted)")
    r.add_argument("--disable_trust_remote_code", action="store_true")
    r.add_argument("--allow_pickle_checkpoint", action="store_true",
                   help="load a model whose weights are only pickle files (pytorch_model.bin); unpickling can run code")
    r.add_argument("--format", "--formats",
                   help="auto_round (default; the scheme's gguf:* preset for a GGUF scheme), auto_round:auto_gptq, "
                        "auto_round:auto_awq, auto_round:gptqmodel, auto_gptq, auto_awq, llm_compressor, fp8, fake, "
                        "gguf:q4_k_m (and every gguf:* preset: q2_k_s, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k, q4_0, "
                        "q4_1, q5_0, q5_1, q8_0, bf16, f16, f32); comma-separated for several (each in OUTPUT_DIR/<format>). "
                        "`auto-round list format` shows what each holds")
    r.add_argument("--output_dir", default="./tmp_autoround")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    r.add_argument("--max_shard_size", default="5GB")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (kill, crash, Ctrl-C) from its per-block checkpoint in "
                        ".<OUTPUT_DIR>.resume/ next to the output dir; refused if any setting, the model or the data differ")
    r.add_argument("--disable_progress", action="store_true", help="no tqdm progress bars (the per-block log lines stay)")
    r.add_argument("--disable_run_report", action="store_true",
                   help="do not write events.jsonl / report.md / the PNG plots into the output directory")
    r.add_argument("--disable_checkpoint", action="store_true",
                   help="do not write per-block checkpoints while tuning (no --resume possible)")
    _switch(r, "low_cpu_mem_usage", True, on=("--low_cpu_mem_usage",), off=("--disable_low_cpu_mem_usage",),
            on_help="pack each block's layers as soon as it is tuned and release their weights (default)",
            off_help="keep the whole fake-quantized model in memory until the export")
    _switch(r, "low_gpu_mem_usage", True, on=("--low_gpu_mem_usage",), off=("--disable_low_gpu_mem_usage",),
            on_help="keep the cached block inputs in host memory while tuning on an accelerator (default)",
            off_help="keep them on the accelerator when they fit there (no copy per step; same results)")
    r.add_argument("--memory_limit", help="memory the tuning may use, e.g. 12GB (default: the free host memory, "
                                          "or the free device memory on CUDA); the predicted peak is checked against it")
    r.add_argument("--recompute_qdq", action="store_true",
                   help="MX / NVFP4 / FP8 tuning: rebuild each layer's qdq graph in the backward pass instead of "
                        "keeping it (same results, 3 bytes per weight less memory, a few %% slower; the memory "
                        "planner turns it on by itself when the predicted peak does not fit otherwise)")
    r.add_argument("--disable_reuse_freed_memory", dest="reuse_freed_memory", action="store_false",
                   help="let glibc's malloc return freed memory to the OS during tuning as it does by default "
                        "(by default the tuning keeps it for the next step: ~10 %% faster on CPU, same peak RSS; "
                        "blocks above 32 MiB only when the memory plan has room: ~20 %% faster, +10-14 %% peak RSS)")
    r.add_argument("--disable_auto_adjust_memory", action="store_true",
                   help="when the predicted peak exceeds the memory, fail instead of halving --batch_size and "
                        "doubling --gradient_accumulate_steps (same effective batch, slightly different numerics)")
    r.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    r.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    add_eval_args(p)
    return p


def _bits_value(text: str) -> "int | float":
    """'4' -> 4, '3.0' -> 3, '2.5' -> 2.5 (a fractional value is only valid as an AutoScheme target)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits must be a number, got {text!r}") from None
    return int(value) if value.is_integer() else value


def _auto_scheme(args: argparse.Namespace):
    """The AutoScheme of --schemes (None without it); --bits is then the target. Checked before loading."""
    if not args.schemes:
        if isinstance(args.bits, float):
            raise ValueError(f"--bits must be an integer without --schemes, got {args.bits}; for mixed bits give "
                             "--schemes W2A16G64,W4A16G64 --bits 3.0")
        if args.avg_bits:
            raise ValueError("--avg_bits needs --schemes (the candidate options), e.g. --schemes W2A16G64,W4A16G64")
        return None
    if args.scheme is not None:
        raise ValueError("--scheme and --schemes are mutually exclusive: --schemes lists AutoScheme's options")
    target = args.avg_bits if args.avg_bits else args.bits
    if target is None:
        raise ValueError("--schemes needs a target: --bits 3.0 (or --avg_bits 3.0)")
    from ..algorithms.autoscheme import AutoScheme

    args.bits = None
    return AutoScheme(target, args.schemes, shared_layers=args.shared_layers,
                      share_fused_layers=args.share_fused_layers, ignore_scale_zp_bits=args.ignore_scale_zp_bits, batch_size=args.auto_scheme_batch_size,
                      nsamples=args.auto_scheme_nsamples, seqlen=args.auto_scheme_seqlen, score=args.auto_scheme_score)


def _default_scheme_and_format(args: argparse.Namespace) -> None:
    """A gguf:* format alone sets the scheme, a gguf:* scheme alone sets the format (reference behaviour)."""
    is_gguf = lambda name: isinstance(name, str) and name.strip().lower().startswith("gguf:")  # noqa: E731
    if args.scheme is None:
        args.scheme = args.format.strip() if is_gguf(args.format) and "," not in args.format else "W4A16"
    if args.format is None:
        args.format = args.scheme.strip().lower() if is_gguf(args.scheme) else "auto_round"


def _apply_recipe(args: argparse.Namespace, recipe: str) -> None:
    for key, value in RECIPES[recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _layer_config(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--layer_config is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError("--layer_config must be a JSON object mapping layer names to settings")
    return value


def main(argv: Optional[Sequence[str]] = None, recipe: str = "default", prog: str = "auto-round") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["list"]:  # `auto-round list format`: the support matrix, no model needed
        from .listing import listing

        try:
            print(listing(argv[1] if len(argv) > 1 else "format"))
        except ValueError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        return 0
    if argv[:1] == ["eval"] or "--eval" in argv:  # evaluate an existing model, no quantization
        from .eval_cmd import main as eval_main

        rest = argv[1:] if argv[:1] == ["eval"] else [a for a in argv if a != "--eval"]
        return eval_main(rest, prog=prog)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = args.model or args.model_pos
    if not model:
        parser.error("a model is required (positional MODEL or --model)")
    # --model_free is plain RTN: its run takes the rtn recipe's settings where none were given
    _apply_recipe(args, "rtn" if args.model_free else recipe)
    try:
        auto_scheme = _auto_scheme(args)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if auto_scheme is not None and auto_scheme.is_gguf and args.format is None:
        args.format = f"gguf:{auto_scheme.mixes[0]}"  # GGUF options are written as a GGUF file
    _default_scheme_and_format(args)
    from ..compressor import AutoRound  # imported late so that -h stays fast
    from ..compressor_export import format_dirs
    from ..export import parse_formats
    from ..export.writer import check_output_dir
    from ..model.resume_hook import QuantizationInterrupted

    try:
        # cheap checks first: nobody should wait for a model to load to learn the output dir is taken
        for directory in format_dirs(Path(args.output_dir), parse_formats(args.format)).values():
            check_output_dir(directory, args.overwrite, Path(model) if Path(model).is_dir() else None)
        if not args.disable_checkpoint:
            from ..model.checkpoint_resume import check_checkpoint_dir

            check_checkpoint_dir(args.output_dir, args.resume, args.overwrite)
        eval_tasks = check_tasks(args)  # unknown task names fail now, not after the tuning
        ar = AutoRound(
            model, scheme=auto_scheme if auto_scheme is not None else args.scheme, bits=args.bits, group_size=args.group_size,
            sym=False if args.asym else None, data_type=args.data_type, act_bits=args.act_bits,
            act_data_type=args.act_data_type, act_group_size=args.act_group_size,
            act_sym=False if args.act_asym else None, act_dynamic=False if args.disable_act_dynamic else None,
            layer_config=_layer_config(args.layer_config), fp_layers=args.fp_layers,
            quant_lm_head=args.quant_lm_head, to_quant_block_names=args.to_quant_block_names,
            dataset=args.dataset, iters=args.iters, lr=args.lr, minmax_lr=args.minmax_lr,
            nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
            gradient_accumulate_steps=args.gradient_accumulate_steps,
            enable_minmax_tuning=not args.disable_minmax_tuning, fp8_clip_tuning=args.enable_fp8_clip_tuning,
            enable_quanted_input=not args.disable_quanted_input, not_use_best_mse=args.not_use_best_mse,
            seed=args.seed, momentum=args.momentum, enable_adam=args.enable_adam,
            enable_deterministic_algorithms=args.enable_deterministic_algorithms,
            disable_opt_rtn=args.disable_opt_rtn, enable_alg_ext=args.enable_alg_ext,
            massive_token_cap=args.massive_token_cap, amp=args.amp, amp_dtype=args.amp_dtype,
            amp_attention=args.amp_attention, enable_torch_compile=args.enable_torch_compile,
            scale_dtype=args.scale_dtype, model_dtype=args.model_dtype, device=args.device,
            trust_remote_code=not args.disable_trust_remote_code, max_shard_size=args.max_shard_size,
            low_cpu_mem_usage=args.low_cpu_mem_usage, low_gpu_mem_usage=args.low_gpu_mem_usage,
            num_hidden_layers=args.num_hidden_layers, model_free=args.model_free,
            allow_pickle_checkpoint=args.allow_pickle_checkpoint,
            resume=args.resume, checkpoint=not args.disable_checkpoint, disable_progress=args.disable_progress,
            run_report=not args.disable_run_report,
            memory_limit=args.memory_limit, auto_adjust_memory=not args.disable_auto_adjust_memory,
            recompute_qdq=args.recompute_qdq, reuse_freed_memory=args.reuse_freed_memory,
        )
        _, paths = ar.quantize_and_save(args.output_dir, format=args.format, overwrite=args.overwrite)
        for path in paths:
            print(f"saved: {path}")
        if eval_tasks:
            del ar  # the quantized model in memory is not needed: the export is reloaded from disk
            evaluate_after_quantize(args, model, eval_tasks, paths)
    except ValueError as err:  # every input error of the package is a ValueError subclass
        if args.debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except QuantizationInterrupted as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 130
    except (KeyboardInterrupt, MemoryError, OSError, RuntimeError, NotImplementedError) as err:
        if args.debug:
            raise
        kind = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
        print(f"{prog}: error: {kind} (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    sys.exit(main())


def run_best() -> None:
    sys.exit(main(recipe="best", prog="auto-round-best"))


def run_light() -> None:
    sys.exit(main(recipe="light", prog="auto-round-light"))


def run_rtn() -> None:
    sys.exit(main(recipe="rtn", prog="auto-round-rtn"))
