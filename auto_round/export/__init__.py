"""Export formats behind one registry.

    auto_round[:auto_gptq|:auto_awq|:gptqmodel]   the native format (export/auto_round.py); MX / NVFP4 / FP8 as
    auto_round[:llm_compressor|:fp8_static]       (export/auto_round_float.py)
    auto_gptq                                     GPTQ v1 (export/gptq.py)
    auto_awq                                      AutoAWQ GEMM (export/awq.py)
    llm_compressor                                compressed-tensors pack-quantized (export/llm_compressor.py)
    fp8                                           FP8_BLOCK as DeepSeek / FineGrainedFP8 (export/fp8.py)
    fake                                          the fake-quantized float model (export/fake.py)
    gguf:<mix>                                    one llama.cpp GGUF file (export/gguf_export.py, export/gguf/)

Every format is validated against the layers to quantize before tuning (`check_format`), and the formats
whose layers pack independently can pack each block as soon as it is tuned (`block_packer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .auto_round import PACKINGS, check_requested_packing, choose_packing_for, pack_result, save_auto_round
from .awq import check_awq, pack_awq_layer, save_auto_awq
from .checkpoint import PackFn
from .context import ExportContext
from .fake import save_fake
from .fp8 import check_fp8, fp8_misfit, pack_fp8_layer, save_fp8
from .gguf_export import gguf_formats, mix_of_format, pack_gguf_layer, save_gguf
from .gptq import check_gptq, pack_gptq_layer, save_auto_gptq
from .llm_compressor import check_llm_compressor, pack_ct_layer, save_llm_compressor
from .auto_round_float import FLOAT_PACKINGS, auto_round_misfit, check_auto_round_packing, float_packing_of
from .llm_compressor_float import ct_misfit
from .manifest import write_manifest
from .writer import ExportError, atomic_output_dir

logger = logging.getLogger("auto_round")

Writer = Callable[[ExportContext, Path, "str | None"], dict]

_WRITERS: dict[str, Writer] = {
    "auto_round": lambda ctx, d, variant: save_auto_round(ctx, d, variant),
    "auto_gptq": lambda ctx, d, variant: save_auto_gptq(ctx, d),
    "auto_awq": lambda ctx, d, variant: save_auto_awq(ctx, d),
    "llm_compressor": lambda ctx, d, variant: save_llm_compressor(ctx, d),
    "fake": lambda ctx, d, variant: save_fake(ctx, d),
    "fp8": lambda ctx, d, variant: save_fp8(ctx, d),
    "gguf": lambda ctx, d, variant: save_gguf(ctx, d, variant),
}


def supported_formats() -> list[str]:
    return sorted((set(_WRITERS) - {"gguf"}) | set(PACKINGS) | set(gguf_formats()))


def parse_formats(formats: "str | list[str]") -> list[str]:
    """'auto_round,fake' -> ['auto_round', 'fake'], validated; raises ExportError on unknown or repeated names."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [f.strip().lower() for f in items if f.strip()]
    if not names:
        raise ExportError("no export format given")
    for name in names:
        if name not in supported_formats():
            raise ExportError(f"unknown or not yet supported format {name!r}; supported: {', '.join(supported_formats())}")
    if len(set(names)) != len(names):
        raise ExportError(f"format listed twice: {formats!r}")
    ggufs = [n for n in names if mix_of_format(n)]
    if ggufs and (len(ggufs) > 1 or len(names) > 1):
        raise ExportError(f"{', '.join(ggufs)}: a GGUF preset decides how every tensor is quantized, so it cannot "
                          f"be combined with other formats in one run ({formats!r}); quantize once per GGUF preset")
    return names


def check_format(fmt: str, layers: dict, outside_blocks: frozenset = frozenset(), conv1d: frozenset = frozenset(),
                 out_features: Optional[dict] = None) -> None:
    """Validate a format against the layers to quantize (name -> (scheme, in_features)) before tuning.

    outside_blocks: names of the layers that are not inside the block lists (lm_head); conv1d: names of
    transformers Conv1D layers (GPT-2 style); out_features: name -> out_features where known (fp8 blocks).
    """
    quantized = {n: v for n, v in layers.items() if v[0].is_quantized}
    if not mix_of_format(fmt) and fmt != "fake" and any(v[0].gguf is not None for v in quantized.values()):
        raise ExportError(f"{fmt!r} cannot hold ggml (GGUF) quantized layers; export them with a gguf:* format")
    _check_float_and_act_layers(fmt, quantized)
    if fmt in PACKINGS:
        check_requested_packing(fmt, quantized)
        check_auto_round_packing(quantized)
        if fmt in FLOAT_PACKINGS:
            ints = sorted(n for n, (s, _) in quantized.items() if float_packing_of(s) != fmt)
            if ints:
                raise ExportError(f"{fmt} holds {'FP8' if 'fp8' in fmt else 'MX / NVFP4'} weights; {ints[0]} is "
                                  f"{_describe(quantized[ints[0]][0])}. Use format 'auto_round'")
    elif fmt == "auto_gptq":
        check_gptq(quantized)
    elif fmt == "auto_awq":
        if any(n in outside_blocks for n in quantized):
            raise ExportError("auto_awq cannot hold quantized layers outside the blocks (lm_head); use 'auto_round'")
        check_awq(quantized)
    elif fmt == "llm_compressor":
        check_llm_compressor(quantized, conv1d)
    elif fmt == "fp8":
        check_fp8(quantized, out_features)
    elif mix_of_format(fmt):
        plain = sorted(n for n, v in quantized.items() if v[0].gguf is None)
        if plain:
            raise ExportError(f"{fmt}: layers {plain[:3]} are not quantized to a ggml type; use scheme {fmt!r}")


# formats that hold MX / NVFP4 / FP8 weights or quantized activations for some schemes (the rest hold integer
# weight-only layers only); `float_misfit` says which scheme each can hold
FLOAT_FORMATS = ("auto_round", "llm_compressor", "fp8", "fake")


def float_misfit(fmt: str, scheme, in_features: int) -> Optional[str]:
    """Why `fmt` cannot hold a layer whose weights are not integer or whose activations are quantized (None: it can)."""
    if fmt == "fake":
        return None
    if fmt == "llm_compressor":
        return ct_misfit(scheme, in_features)
    if fmt == "auto_round" or fmt in FLOAT_PACKINGS:
        return auto_round_misfit(fmt, scheme, in_features)
    if fmt == "fp8":
        return fp8_misfit(scheme, in_features)
    return "it holds integer weight-only layers only"


def _describe(s) -> str:
    what = f"{s.data_type} W{s.bits}A{s.act_bits}"
    if s.quantizes_activations:
        what += f" ({s.resolved_act_data_type} activations, {'dynamic' if s.act_dynamic else 'static'})"
    return what


def _check_float_and_act_layers(fmt: str, quantized: dict) -> None:
    odd = {n: v for n, v in quantized.items() if v[0].gguf is None and (not v[0].is_int or v[0].quantizes_activations)}
    for name, (s, in_features) in odd.items():
        problem = float_misfit(fmt, s, in_features)
        if problem is None:
            continue
        holders = [f for f in FLOAT_FORMATS if float_misfit(f, s, in_features) is None]
        n_same = sum(1 for v in odd.values() if v[0] == s)
        raise ExportError(f"format {fmt!r} cannot hold layer {name}, {_describe(s)} ({n_same} such layers): {problem}. "
                          f"Formats that can hold it: {', '.join(holders)}")


@dataclass(frozen=True)
class BlockPacker:
    """Packs quantized layers as soon as their block is done (immediate packing, low_cpu_mem_usage).

    fmt: the one format the packed tensors are for; packing: the auto_round packing fixed before tuning
    (None for the other formats); pack(name, result) gives the tensors the export will write.
    """

    fmt: str
    pack: PackFn
    packing: Optional[str] = None


def block_packer(fmt: str, layers: dict, scale_dtype_name: str) -> Optional[BlockPacker]:
    """A BlockPacker for formats whose layers pack independently of each other, else None.

    layers: name -> (scheme, in_features) of every quantized layer.
    """
    if not layers:
        return None
    if fmt in PACKINGS:
        packing = choose_packing_for(layers, fmt)
        return BlockPacker(fmt, lambda name, res: pack_result(name, res, packing, scale_dtype_name), packing)
    if fmt == "auto_gptq":
        return BlockPacker(fmt, pack_gptq_layer)
    if fmt == "auto_awq":
        return BlockPacker(fmt, pack_awq_layer)
    if fmt == "llm_compressor":
        scale_dtype = torch.float16 if scale_dtype_name == "torch.float16" else torch.float32
        return BlockPacker(fmt, lambda name, res: pack_ct_layer(name, res, scale_dtype))
    if mix_of_format(fmt):
        return BlockPacker(fmt, pack_gguf_layer)
    if fmt == "fp8":
        return BlockPacker(fmt, pack_fp8_layer)
    return None


def export(ctx: ExportContext, output_dir: "str | Path", fmt: str, overwrite: bool = False) -> Path:
    """Write one format atomically into output_dir. Returns the final directory."""
    family = fmt if fmt in _WRITERS else fmt.partition(":")[0]
    variant = fmt if fmt in PACKINGS or mix_of_format(fmt) else None
    if ctx.packed and fmt != ctx.packed_for:
        raise ExportError(
            f"cannot write {fmt!r}: the quantized weights were released after being packed for {ctx.packed_for!r} "
            "(immediate packing); quantize with low_cpu_mem_usage=False, or pass every format to quantize_and_save"
        )
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        _WRITERS[family](ctx, tmp, variant)
        for name, text in ctx.extra_files.items():
            (Path(tmp) / name).write_text(text)
        write_manifest(tmp, fmt, ctx.run_info)  # last: its presence marks a finished directory
    final = Path(output_dir).expanduser().resolve()
    logger.info("saved %s checkpoint to %s", fmt, final)
    return final


__all__ = ["BlockPacker", "ExportContext", "ExportError", "block_packer", "check_format", "export",
           "parse_formats", "supported_formats"]
