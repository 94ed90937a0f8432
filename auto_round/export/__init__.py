"""Export formats behind one registry: format string -> writer(ctx, directory, variant)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .auto_round import PACKINGS, check_requested_packing, choose_packing_for, pack_result, save_auto_round
from .context import ExportContext
from .fake import save_fake
from .writer import ExportError, atomic_output_dir

logger = logging.getLogger("auto_round")

Writer = Callable[[ExportContext, Path, "str | None"], dict]

_REGISTRY: dict[str, Writer] = {
    "auto_round": lambda ctx, d, variant: save_auto_round(ctx, d, variant),
    "fake": lambda ctx, d, variant: save_fake(ctx, d),
}


def supported_formats() -> list[str]:
    return sorted(set(_REGISTRY) | set(PACKINGS))


def parse_formats(formats: "str | list[str]") -> list[str]:
    """'auto_round,fake' -> ['auto_round', 'fake'], validated; raises ExportError on unknown names."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [f.strip().lower() for f in items if f.strip()]
    if not names:
        raise ExportError("no export format given")
    for name in names:
        if name not in supported_formats():
            raise ExportError(f"unknown or not yet supported format {name!r}; supported: {', '.join(supported_formats())}")
    return names


def check_format(fmt: str, layers: dict) -> None:
    """Validate a format against the layers to quantize (name -> (scheme, in_features)) before tuning."""
    if fmt in PACKINGS:
        check_requested_packing(fmt, {n: v for n, v in layers.items() if v[0].is_quantized})


class BlockPacker:
    """Packs quantized layers as soon as their block is done (immediate packing, low_cpu_mem_usage).

    Holds the packing fixed before tuning; `pack(name, result)` gives the tensors the export will write.
    """

    def __init__(self, fmt: str, packing: str, scale_dtype_name: str):
        self.fmt, self.packing, self.scale_dtype_name = fmt, packing, scale_dtype_name

    def pack(self, name: str, result) -> dict:
        return pack_result(name, result, self.packing, self.scale_dtype_name)


def block_packer(fmt: str, layers: dict, scale_dtype_name: str) -> "BlockPacker | None":
    """A BlockPacker for formats whose layers pack independently of each other, else None.

    layers: name -> (scheme, in_features) of every quantized layer.
    """
    if fmt not in PACKINGS or not layers:
        return None
    return BlockPacker(fmt, choose_packing_for(layers, fmt), scale_dtype_name)


def export(ctx: ExportContext, output_dir: "str | Path", fmt: str, overwrite: bool = False) -> Path:
    """Write one format atomically into output_dir. Returns the final directory."""
    family, _, _ = fmt.partition(":")
    variant = fmt if fmt in PACKINGS else None
    writer = _REGISTRY[family]
    if ctx.packed and fmt not in ("auto_round", ctx.packing):
        raise ExportError(
            f"cannot write {fmt!r}: the quantized weights were released after being packed as {ctx.packing} "
            "(immediate packing); quantize with low_cpu_mem_usage=False to export several formats"
        )
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        writer(ctx, tmp, variant)
    final = Path(output_dir).expanduser().resolve()
    logger.info("saved %s checkpoint to %s", fmt, final)
    return final


__all__ = ["BlockPacker", "ExportContext", "block_packer", "ExportError", "check_format", "export", "parse_formats", "supported_formats"]
