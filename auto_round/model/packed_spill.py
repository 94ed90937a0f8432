"""Keep the packed layers of finished blocks on disk instead of in memory until the export writes them.

With immediate packing (quantize_and_save, low_cpu_mem_usage) every finished block's layers are packed at
once and their float weights released, but the packed tensors themselves stayed in memory until the export:
the output's whole size (SmolLM2 W4: 54 MiB; a 70B model: ~35 GB) on top of the tuning's own peak. Here each
block's packed tensors are written to one safetensors file in a work directory next to the output and
replaced by memory-mapped views of that file: nothing of them stays resident while tuning goes on, and the
export reads them back page by page (clean file pages, which the OS can drop again). The work directory is
`.<output dir name>.packed` beside the output (the same disk, not a RAM-backed /tmp); it is removed when
the export is done or failed, and a stale one from a killed run is replaced.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .memory import evict_clean_file_pages

PackedLayers = dict[str, dict[str, torch.Tensor]]  # layer name -> its packed state-dict tensors


class PackedSpillError(OSError):
    """The packed tensors of a block could not be written to the work directory (disk full, no permission)."""


def spill_dir_for(output_dir: "str | Path") -> Path:
    out = Path(output_dir).expanduser().resolve()
    return out.parent / f".{out.name}.packed"


def _left_by_a_killed_run(name: str) -> bool:
    """A block file of ours, or the temporary file safetensors' save_file writes it through (Rust tempfile's
    `.tmp` + 6 characters, renamed into place when complete): a run killed mid-write leaves one behind."""
    return name.endswith(".safetensors") or re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", name) is not None


class PackedSpill:
    """One safetensors file per finished block in `directory`; `put` returns memory-mapped replacements."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._files = 0

    @classmethod
    def start(cls, directory: "str | Path") -> "PackedSpill":
        """A fresh, empty work directory (a stale one of a killed run is removed first)."""
        directory = Path(directory)
        if directory.exists():
            foreign = [p.name for p in directory.iterdir() if not _left_by_a_killed_run(p.name)] \
                if directory.is_dir() else [directory.name]
            if foreign:  # not what a killed run of ours leaves behind: never delete someone else's files
                raise PackedSpillError(f"{directory} is in the way of the packed-layer work directory and holds "
                                       f"other files ({', '.join(sorted(foreign)[:3])}); move it or choose another "
                                       "output directory")
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        return cls(directory)

    def put(self, layers: PackedLayers) -> PackedLayers:
        """Write `layers` to the next file; returns the same names and keys as memory-mapped tensors.

        Layers whose packed form is not all torch tensors (GGUF's ggml blocks: numpy bytes and a type name)
        are returned as they are, in memory."""
        kept = {name: packed for name, packed in layers.items()
                if not all(isinstance(t, torch.Tensor) for t in packed.values())}
        layers = {name: packed for name, packed in layers.items() if name not in kept}
        if not layers:
            return kept
        path = self.directory / f"{self._files:05d}.safetensors"
        self._files += 1
        tensors = {key: t.contiguous() for packed in layers.values() for key, t in packed.items()}
        index = {name: list(packed) for name, packed in layers.items()}
        if len(tensors) != sum(len(keys) for keys in index.values()):
            raise ValueError("two packed layers share a tensor name: " + ", ".join(index))
        try:
            save_file(tensors, str(path), metadata={"layers": json.dumps(index)})
        except OSError as err:
            need = sum(t.numel() * t.element_size() for t in tensors.values())
            raise PackedSpillError(f"could not write {need / 2**20:.1f} MiB of packed layers to {path}: {err}; "
                                   "free disk space next to the output directory, or pass low_cpu_mem_usage=False "
                                   "(CLI: --disable_low_cpu_mem_usage) to keep them in memory") from err
        with safe_open(str(path), framework="pt") as handle:  # the returned tensors keep their maps alive
            mapped = {name: {key: handle.get_tensor(key) for key in keys} for name, keys in index.items()}
        for packed in mapped.values():  # opening the file may map some freshly written pages in (fault-around)
            for tensor in packed.values():
                evict_clean_file_pages(tensor)
        return {**mapped, **kept}

    def remove(self) -> None:
        """Delete the work directory. Tensors already returned stay readable (the maps outlive the files)."""
        shutil.rmtree(self.directory, ignore_errors=True)
