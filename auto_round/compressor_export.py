"""AutoRound's export side: check the output and formats before tuning, and build the ExportContext.

Kept out of compressor.py. `check_export` runs before any quantization (so a bad output directory or a
format the layers cannot take fails in seconds, not after minutes of tuning); `export_context` gathers
what the format writers need once the model is quantized.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .export import ExportContext, check_format, parse_formats
from .export.gguf import check_gguf_arch
from .export.writer import ExportError, check_output_dir
from .algorithms.autoscheme.spec import scheme_label
from .layers import is_conv1d, layer_shape
from .schemes import QuantScheme, gguf_mix_of, resolve_scheme

if TYPE_CHECKING:
    from .compressor import AutoRound

logger = logging.getLogger("auto_round")

SCALE_DTYPES = {torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16", torch.float32: "torch.float32"}


def export_context(ar: "AutoRound") -> ExportContext:
    """What the exporters need of a quantized AutoRound: model, results, schemes and the run's settings."""
    t = ar.tuning
    tuning = {
        "iters": t.iters, "lr": t.resolved_lr if t.iters else None, "minmax_lr": t.resolved_minmax_lr if t.iters else None,
        "nsamples": ar.nsamples if t.iters else None, "seqlen": ar.seqlen if t.iters else None,
        "batch_size": t.batch_size, "gradient_accumulate_steps": t.gradient_accumulate_steps,
        "enable_minmax_tuning": t.enable_minmax_tuning,
        # ours only: whether fp8 weight clips were tuned too (the reference always does)
        "fp8_clip_tuning": t.fp8_clip_tuning and t.enable_minmax_tuning if t.iters else None,
        "enable_alg_ext": t.enable_alg_ext and t.iters > 0,
        "enable_adam": t.enable_adam and t.iters > 0,
        # ours only (the reference always tunes on the plain MSE): recorded so a checkpoint says how it was made
        "massive_token_cap": t.massive_token_cap if t.iters else None,
        # RTN feeds no quantized inputs anywhere; the reference records that too
        "enable_quanted_input": ar.enable_quanted_input and t.iters > 0,
        # (the reference's key: block inputs kept off the accelerator; never applies to a CPU run)
        "low_gpu_mem_usage": ar.low_gpu_mem_usage and torch.device(ar.device).type != "cpu" and t.iters > 0,
    }
    run_info = {
        "seed": ar.seed, "scheme": ar.scheme.to_dict(), "tuning": tuning,
        "amp_dtype": str(t.amp_dtype) if t.iters and t.amp_dtype is not None else None,
        "scale_dtype": SCALE_DTYPES[ar.scale_dtype], "device_type": torch.device(ar.device).type,
        "model_free": ar.model_free,
        "calibration": ar.calibration_info,
        "layers": {"quantized": sum(s.is_quantized for s in ar.layer_schemes.values()),
                   "kept_in_fp": sum(not s.is_quantized for s in ar.layer_schemes.values())},
        "block_losses": {n: {"first": st.loss_first, "best": st.loss_best, "best_iter": st.best_iter}
                         for n, st in ar.block_stats.items()},
    }
    extra_files: dict[str, str] = {}
    if ar.auto_scheme_plans:
        from .compressor_autoscheme import plan_files, plan_run_info

        extra_files = plan_files(ar.auto_scheme_plans)
        run_info["auto_scheme"] = plan_run_info(ar.auto_scheme_plans)
    return ExportContext(
        extra_files=extra_files, model=ar.model, tokenizer=ar.tokenizer, results=ar.results, layer_schemes=ar.layer_schemes,
        scheme=ar.scheme, block_groups=ar.block_groups, tuning=tuning, max_shard_size=ar.max_shard_size,
        scale_dtype_name=SCALE_DTYPES[ar.scale_dtype],
        packing=ar._packer.packing if ar.packed else None, packed=ar.packed,
        packed_for=ar._packer.fmt if ar.packed else None, run_info=run_info, source_dtypes=ar.source_dtypes,
    )

def default_format(ar: "AutoRound") -> str:
    """The export format when none is given: the GGUF file of a gguf:* scheme (or of GGUF AutoScheme options:
    the first option's mix), else auto_round."""
    return f"gguf:{ar.gguf.mix}" if ar.gguf is not None else "auto_round"


def check_export(ar: "AutoRound", output_dir: "str | Path", format: "str | None", overwrite: bool
                 ) -> tuple[list[str], dict[str, Path], dict[str, tuple[QuantScheme, int]]]:
    """(formats, their directories, layer -> (scheme, in_features)), checked against the output dirs and
    the layers (before any tuning). format None: default_format."""
    formats = parse_formats(format if format is not None else default_format(ar))
    adopt_gguf_format(ar, formats)
    targets = format_dirs(Path(output_dir), formats)
    for d in targets.values():
        check_output_dir(d, overwrite, ar.source_dir)
    if ar.auto_scheme is not None and not ar.quantized:
        if ar.auto_scheme.is_gguf:  # before the scoring: the mix's ggml types go where the plan's will
            _check_layers(ar, formats)
        else:
            check_options_exportable(ar, formats)
        ar._plan_auto_scheme()  # the formats are checked against the plan
    return formats, targets, _check_layers(ar, formats)


def _check_layers(ar: "AutoRound", formats: list[str]) -> dict[str, tuple[QuantScheme, int]]:
    """check_format of every format against ar.layer_schemes; returns layer -> (scheme, in_features)."""
    layers = {n: (s, layer_shape(ar.model.get_submodule(n))[1]) for n, s in ar.layer_schemes.items()}
    outside = frozenset(n for n in layers if not any(n.startswith(g + ".") for g in ar.block_groups))
    conv1d = frozenset(n for n in layers if is_conv1d(ar.model.get_submodule(n)))
    out_features = {n: layer_shape(ar.model.get_submodule(n))[0] for n in layers}
    for fmt in formats:
        check_format(fmt, layers, outside, conv1d, out_features)
    return layers

def check_options_exportable(ar: "AutoRound", formats: list[str]) -> None:
    """Before the (slow) scoring: each option alone must be writable in every format, and so must a mix of
    them (an auto_round checkpoint holds one packing: NVFP4 and FP8 options cannot share one)."""
    names = list(ar.layer_schemes)
    outside = frozenset(n for n in names if not any(n.startswith(g + ".") for g in ar.block_groups))
    conv1d = frozenset(n for n in names if is_conv1d(ar.model.get_submodule(n)))
    shapes = {n: layer_shape(ar.model.get_submodule(n)) for n in names}
    out_features = {n: shape[0] for n, shape in shapes.items()}
    options = ar.auto_scheme.schemes

    def block_index(name: str) -> int:
        group = next((g for g in ar.block_groups if name.startswith(g + ".")), None)
        return 0 if group is None else int(name[len(group) + 1:].split(".")[0])

    def layers_with(pick) -> dict[str, tuple[QuantScheme, int]]:
        return {n: (pick(block_index(n)) if s.is_quantized else s, shapes[n][1]) for n, s in ar.layer_schemes.items()}

    for fmt in formats:
        for label, option in zip(ar.auto_scheme.labels, options):
            try:
                check_format(fmt, layers_with(lambda i: option), outside, conv1d, out_features)
            except ExportError as err:
                raise ExportError(f"AutoScheme option {label} cannot be written as {fmt!r}: {err}") from err
        if len(options) > 1:  # every option fits every layer (above), so a failure now is the mix itself;
            # whole blocks take one option, as fused groups (q/k/v, gate/up) always do in a shared plan
            try:
                check_format(fmt, layers_with(lambda i: options[i % len(options)]), outside, conv1d, out_features)
            except ExportError as err:
                raise ExportError(f"AutoScheme options {', '.join(ar.auto_scheme.labels)} cannot be mixed in one "
                                  f"{fmt!r} checkpoint: {err}") from err

def adopt_gguf_format(ar: "AutoRound", formats: list[str]) -> None:
    """format='gguf:<mix>' decides the scheme when none was given for it (reference behaviour): before
    quantization the layers are re-planned for the mix; after, the mix must be the one quantized for."""
    mix = gguf_mix_of(formats[0])  # parse_formats lets a gguf format only come alone
    if mix is None:
        return  # a non-GGUF format of GGUF layers is refused by check_format
    if ar.auto_scheme is not None and not ar.auto_scheme.is_gguf:
        raise ExportError(f"format {formats[0]!r} needs GGUF tensor types; these AutoScheme options are int / float "
                          "schemes for the auto_round, gptq, llm_compressor and fake formats (give gguf:* options "
                          "for a GGUF file)")
    check_gguf_arch(ar.model.config)
    current = ar.gguf.mix if ar.gguf is not None else None
    if mix == current:
        return
    if ar.quantized or ar.auto_scheme_plans is not None:
        raise ExportError(f"the model was {'quantized' if ar.quantized else 'planned'} for "
                          f"{'gguf:' + current if current else 'a non-GGUF scheme'}; format {formats[0]!r} needs "
                          f"scheme {formats[0]!r} at quantization time")
    # AutoScheme with GGUF options: the format's mix gives the embedding / output types and the file type;
    # the plan (made later) gives the block layers theirs
    if ar.auto_scheme is None and ar.scheme != resolve_scheme("W4A16"):  # W4A16 is the default: nothing asked
        logger.warning("format %s quantizes with llama.cpp's %s tensor types, not the scheme %s given; pass "
                       "scheme %r (or the gguf:* format wanted) to silence this", formats[0], mix,
                       scheme_label(ar.scheme), formats[0])
    logger.info("format %s: quantizing with llama.cpp's %s tensor types", formats[0], mix)
    ar.scheme = resolve_scheme(formats[0])
    ar._resolve_layers(mix)



def format_dirs(output_dir: Path, formats: list[str]) -> dict[str, Path]:
    """Where each format goes: output_dir itself for one format, output_dir/<format> for several."""
    if len(formats) == 1:
        return {formats[0]: output_dir}
    return {f: output_dir / f.replace(":", "-").replace("_", "-") for f in formats}  # the reference's names
