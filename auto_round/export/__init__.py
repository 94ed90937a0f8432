"""Export formats behind one registry: format string -> writer(ctx, directory, variant)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .auto_round import PACKINGS, check_requested_packing, save_auto_round
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


def export(ctx: ExportContext, output_dir: "str | Path", fmt: str, overwrite: bool = False) -> Path:
    """Write one format atomically into output_dir. Returns the final directory."""
    family, _, _ = fmt.partition(":")
    variant = fmt if fmt in PACKINGS else None
    writer = _REGISTRY[family]
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        writer(ctx, tmp, variant)
    final = Path(output_dir).expanduser().resolve()
    logger.info("saved %s checkpoint to %s", fmt, final)
    return final


__all__ = ["ExportContext", "ExportError", "check_format", "export", "parse_formats", "supported_formats"]
