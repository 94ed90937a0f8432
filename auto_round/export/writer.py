"""Checkpoint writing shared by the export formats: atomic output dirs and safetensors shards.

An export is built in a hidden temporary sibling of the output directory and moved into place only
when every file is written, so a crash or an error never leaves a half-written directory that looks
complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import save_file

logger = logging.getLogger("auto_round")

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class ExportError(ValueError):
    """An export that cannot be written as asked (format, layout or output directory problem)."""


def parse_size(size: "int | str") -> int:
    """'5GB' / '500MB' / 1000 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise ExportError(f"cannot parse shard size {size!r}; use e.g. '5GB' or '500MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def check_output_dir(output_dir: Path, overwrite: bool, source_dir: "Path | None" = None) -> None:
    """Refuse to replace a non-empty directory unless `overwrite` (never lose a user's files), to write into
    or over the source model's directory, or to write where no directory can be created."""
    output_dir = Path(output_dir).expanduser()
    if source_dir is not None:
        src, out = Path(source_dir).expanduser().resolve(), output_dir.resolve()
        if out == src or src in out.parents:
            raise ExportError(f"output directory {output_dir} is (inside) the source model directory {src}; "
                              "the source model is never written to: choose another --output_dir")
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"output path {output_dir} exists and is not a directory")
    ancestor = output_dir.resolve()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"output directory {output_dir} cannot be created: {ancestor} is a file")
    if not output_dir.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"output directory {output_dir} cannot be created: {ancestor} is not writable")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ExportError(
            f"output directory {output_dir} already exists and is not empty; "
            "choose another --output_dir or pass overwrite=True (CLI: --overwrite)"
        )


@contextlib.contextmanager
def atomic_output_dir(output_dir: "str | Path", overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `output_dir`, on error it is removed."""
    output_dir = Path(output_dir).expanduser().resolve()
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = output_dir.parent / f".{output_dir.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.old-{tag}"
        os.replace(output_dir, old)
    os.replace(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(tensors: Mapping[str, torch.Tensor], directory: Path, max_shard_size: "int | str" = "5GB") -> list[str]:
    """Write tensors as `model.safetensors` or `model-0000i-of-0000N.safetensors` + index. Returns file names."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, tensor in tensors.items():
        nbytes = _tensor_bytes(tensor)
        if sizes[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor.detach().contiguous().cpu()
        sizes[-1] += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


def save_tokenizer(tokenizer, directory: Path) -> None:
    if tokenizer is None:
        return
    tokenizer.save_pretrained(str(directory))


def save_generation_config(model, directory: Path) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(directory))
        except (ValueError, TypeError) as err:  # an invalid generation config must not sink the export
            logger.warning("generation_config not saved: %s", err)


def tied_parameter_names(model) -> set[str]:
    """State-dict names that alias another tensor and must not be written twice (e.g. tied lm_head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = tensor.data_ptr() if tensor.numel() and not tensor.is_meta else id(tensor)
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied
