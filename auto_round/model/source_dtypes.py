"""The floating dtypes a checkpoint stores its tensors in, so an export can write its unquantized tensors back in them.

On CPU the model is tuned in fp32 by default (bf16 matmuls are slow without AMX), but that is a compute choice:
a bf16 hub checkpoint must not come out with its embeddings, norms and lm_head in fp32 (Llama-3-8B: +2.1 GB of
embedding and head alone) and a config that makes every loader default to fp32. The reference writes them in
the dtype it loaded, the checkpoint's own. Here the stored dtype of each tensor is read from the safetensors
headers (so a checkpoint that keeps its norms in fp32 beside bf16 weights gets exactly that back), and the
checkpoint's declared dtype (config.json `torch_dtype` / `dtype`) is what the export's config declares.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from .dtype_convert import SAFETENSORS_FLOAT
from .safetensors_header import CheckpointError, checkpoint_tensors

logger = logging.getLogger("auto_round")

_CONFIG_FLOAT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SourceDtypes:
    """config_dtype: the checkpoint's declared float dtype (else the one holding most of its bytes).
    per_tensor: checkpoint tensor name -> its stored float dtype (names the headers do not hold, e.g. ones
    transformers renames while loading, fall back to config_dtype)."""

    config_dtype: torch.dtype
    per_tensor: Mapping[str, torch.dtype] = field(default_factory=dict)

    def of(self, name: str) -> torch.dtype:
        return self.per_tensor.get(name, self.config_dtype)

    def cast(self, state: dict[str, torch.Tensor],
             skip: "set[str] | frozenset[str]" = frozenset()) -> dict[str, torch.Tensor]:
        """`state` with every floating tensor not in `skip` in its stored dtype (a new dict; tensors already in
        it are the same objects)."""
        return {k: (v.to(self.of(k)) if k not in skip and v.is_floating_point() and v.dtype != self.of(k) else v)
                for k, v in state.items()}


def declared_dtype(config: Mapping) -> Optional[torch.dtype]:
    """The float dtype config.json declares (`torch_dtype`, transformers 5's `dtype`, or the text config's)."""
    for holder in (config, config.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            value = holder.get(key) if isinstance(holder, Mapping) else None
            if isinstance(value, str) and value.replace("torch.", "") in _CONFIG_FLOAT:
                return _CONFIG_FLOAT[value.replace("torch.", "")]
    return None


def read_source_dtypes(folder: "str | Path") -> Optional[SourceDtypes]:
    """The SourceDtypes of a local checkpoint folder; None when it has no floating safetensors tensors and no
    declared dtype (e.g. pickle-only weights with no torch_dtype), so nothing would be restored."""
    folder = Path(folder)
    try:
        entries = checkpoint_tensors(folder)
    except CheckpointError:
        entries = {}
    per_tensor = {name: SAFETENSORS_FLOAT[e.dtype] for name, e in entries.items() if e.dtype in SAFETENSORS_FLOAT}
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    dtype = declared_dtype(config) or _dominant(entries)
    if dtype is None:
        return None
    return SourceDtypes(dtype, per_tensor)


def hub_snapshot_dir(repo_id: str) -> Optional[Path]:
    """The local cache folder of a hub model already downloaded (no network), else None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, no huggingface_hub, offline errors: nothing to read
        return None


def source_dtypes_of(source: str) -> Optional[SourceDtypes]:
    """SourceDtypes of a model path or hub id (read from the local cache after from_pretrained fetched it)."""
    path = Path(source).expanduser()
    folder = path if path.exists() else hub_snapshot_dir(source)
    if folder is None:
        logger.warning("could not find the stored dtypes of %s; the export writes its tensors in the tuning dtype",
                       source)
        return None
    return read_source_dtypes(folder)


def _dominant(entries: Mapping) -> Optional[torch.dtype]:
    """The float dtype holding most bytes of the checkpoint, None without float tensors."""
    sizes: dict[torch.dtype, int] = {}
    for e in entries.values():
        if e.dtype in SAFETENSORS_FLOAT:
            sizes[SAFETENSORS_FLOAT[e.dtype]] = sizes.get(SAFETENSORS_FLOAT[e.dtype], 0) + e.end - e.begin
    return max(sizes, key=sizes.get) if sizes else None
