"""Read and check the headers of safetensors files without touching tensor data (untrusted input).

A safetensors file is: 8 bytes little-endian header length N, N bytes of UTF-8 JSON, then the data region.
The JSON maps tensor names to {"dtype": "F16", "shape": [out, in], "data_offsets": [begin, end]} (offsets
relative to the data region, in bytes) plus an optional "__metadata__" of str -> str.

    tensors = read_header(path)                 # name -> TensorEntry, CheckpointError on any inconsistency
    tensors = checkpoint_tensors(model_dir)     # every tensor of a folder (single file or sharded index)

Everything a file says is checked before it is believed: lengths within the file, JSON types, known dtypes,
non-negative shapes, offsets within the data region and equal to numel x itemsize, no two tensors sharing
bytes and no holes, shard names that stay inside the folder. The cost is reading the headers
(kilobytes), never the data.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"

# dtype name -> bytes per element (the types the safetensors format defines with whole-byte elements)
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
INT_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")


class CheckpointError(ValueError):
    """A checkpoint file or its config is malformed or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it (offsets in bytes within the file's data region)."""

    file: str  # file name inside the checkpoint folder
    dtype: str  # safetensors dtype name, e.g. "I32"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def is_integer(self) -> bool:
        return self.dtype in INT_DTYPES


def is_json_int(value: Any) -> bool:
    """An integer as JSON means it (Python's bool is an int subclass; JSON's true is not a number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, raw: Any, data_len: int) -> TensorEntry:
    where = f"{path.name}: tensor {name!r}"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: header entry is {type(raw).__name__}, expected an object")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(is_json_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_json_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} do not lie within the {data_len}-byte data region")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(f"{where}: {offsets[1] - offsets[0]} bytes stored, but shape {shape} of {dtype} "
                              f"needs {expected}; the file is truncated or corrupt")
    return TensorEntry(path.name, dtype, tuple(shape), offsets[0], offsets[1])


def read_header(path: "str | os.PathLike") -> dict[str, TensorEntry]:
    """name -> TensorEntry of one .safetensors file; CheckpointError naming the problem if it is malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path.name}: {size} bytes is too short for a safetensors file (no header)")
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise CheckpointError(f"{path.name}: header length {length} exceeds the file ({size} bytes) or the "
                                      f"{MAX_HEADER_BYTES}-byte limit; the file is truncated or not safetensors")
            blob = f.read(length)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if not blob.startswith(b"{"):
        raise CheckpointError(f"{path.name}: the header does not start with a JSON object; not a safetensors file")
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path.name}: the header is not valid UTF-8 JSON ({err}); the file is corrupt") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: the header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError(f"{path.name}: __metadata__ must map strings to strings")
    data_len = size - 8 - length
    entries = {name: _entry(path, name, raw, data_len) for name, raw in header.items()}
    _check_layout(path, entries, data_len)
    return entries


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_len: int) -> None:
    """The format's rule: the tensors tile the data region exactly, no holes, no shared bytes."""
    position = 0
    for begin, end, name in sorted((e.begin, e.end, name) for name, e in entries.items()):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else f"leaves a hole at byte {position}"
            raise CheckpointError(f"{path.name}: tensor {name!r} {problem}; the file is corrupt")
        position = end
    if position != data_len:
        raise CheckpointError(f"{path.name}: the tensors cover {position} of the {data_len} data bytes; the file is "
                              "corrupt or was written incompletely")


def _shard_files(folder: Path) -> tuple[list[Path], Optional[dict[str, str]]]:
    """(weight files, the index's weight_map or None): the index's shards (checked to stay inside the folder),
    or every *.safetensors when there is no index."""
    index = folder / INDEX_NAME
    if not index.is_file():
        return sorted(folder.glob("*.safetensors")), None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise CheckpointError(f"{index.name}: not a readable JSON object with a weight_map ({err})") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index.name}: weight_map must map tensor names to shard file names")
    shards = []
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index.name}: shard {name!r} is not a plain file name inside the folder")
        if not (folder / name).is_file():
            raise CheckpointError(f"{index.name}: shard {name!r} is missing from {folder}")
        shards.append(folder / name)
    return shards, weight_map


def checkpoint_tensors(folder: "str | os.PathLike") -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint folder (single file or sharded), headers checked; {} if it has none.

    A tensor named in two files, or named by the index but absent from its shard, is a CheckpointError.
    """
    folder = Path(folder)
    tensors: dict[str, TensorEntry] = {}
    shards, weight_map = _shard_files(folder)
    for shard in shards:
        for name, entry in read_header(shard).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is stored twice ({tensors[name].file} and {shard.name})")
            tensors[name] = entry
    if weight_map is not None:
        missing = [n for n, f in weight_map.items() if tensors.get(n) is None or tensors[n].file != f]
        if missing:
            raise CheckpointError(f"{INDEX_NAME}: {len(missing)} tensors are not in the shard it names, e.g. "
                                  f"{missing[0]!r}")
    return tensors
