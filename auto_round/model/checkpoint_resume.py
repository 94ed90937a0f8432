"""Per-block durable checkpoints of a SignRound run, and resuming from them (`resume=True`, CLI `--resume`).

Layout of the work directory, a hidden sibling of the output directory (`<parent>/.<name>.resume/`):
    block-0003.safetensors   the block's layer results (codes, scales, ...) and its fake-quantized weights;
                             the non-tensor fields of the results as JSON in the safetensors metadata
    inputs-0003.safetensors  the next block's inputs: fp chain `fp_in` [n, T, H], quantized chain `q_in`
    state.json               fingerprint, done blocks, batch-order rng state, block stats -- written LAST
Every file is written to a temporary name and moved into place with os.replace, and state.json only names
files that are complete, so a kill -9 at any moment leaves the previous block's state valid. No pickle.

Fingerprint: SHA-256 over parts that must match for a resume to give the same bytes:
    model        local dir: config.json bytes + per weights file (name, size, mtime_ns, SHA-256 of its first and
                 last MiB); in-memory model / hub id: SHA-256 of every state-dict tensor. Cheap for huge local
                 checkpoints; a copy without preserved mtimes is (safely) seen as another model.
    calibration  SHA-256 of the calibration token ids and mask
    scheme, layers (every layer's resolved scheme), tuning (every SignRound setting), versions (ours, torch)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STATE_NAME = "state.json"
STATE_VERSION = 1


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed (other settings, model or data), or one in the way of a fresh run."""


def checkpoint_dir_for(output_dir: "str | Path") -> Path:
    out = Path(output_dir).expanduser().resolve()
    return out.parent / f".{out.name}.resume"


def check_checkpoint_dir(output_dir: "str | Path", resume: bool, overwrite: bool) -> None:
    """Before any heavy work: a checkpoint of an earlier run is resumed (resume) or discarded (overwrite), never
    silently ignored."""
    d = checkpoint_dir_for(output_dir)
    if d.exists() and not resume and not overwrite:
        raise ResumeError(f"an interrupted run left a checkpoint in {d}: pass resume=True (CLI: --resume) to "
                          "continue it, or overwrite=True (CLI: --overwrite) to discard it and start fresh")


# ---- fingerprint ----------------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _head_tail(path: Path, n: int = 1 << 20) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(n)
        f.seek(max(0, size - n))
        tail = f.read(n)
    return _sha(head + tail)


def model_identity(source: Optional[Path], model: torch.nn.Module) -> str:
    """See the module docstring (model part of the fingerprint)."""
    digest = hashlib.sha256()
    if source is not None and (source / "config.json").is_file():
        digest.update((source / "config.json").read_bytes())
        for p in sorted(source.iterdir()):
            if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf") and p.is_file():
                st = p.stat()
                digest.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}:{_head_tail(p)}".encode())
        return digest.hexdigest()
    for name, t in model.state_dict().items():
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if not t.is_meta:
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    return _sha(json.dumps(parts, sort_keys=True, default=str).encode())


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out.append(f"{key} ({', '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in sub[:5])})")
        else:
            out.append(key)
    return out


# ---- pickle-free encoding of layer results ---------------------------------------------------------
def _classes() -> dict[str, type]:
    from ..algorithms.float_tunable import FloatQuantResult
    from ..algorithms.gguf import GGUFLayerResult
    from ..algorithms.tunable import LayerQuantResult
    from ..quant.fp8_qdq import BlockLayout
    from ..quant.gguf.types import GGUFParams
    from ..quant.int_qdq import GroupLayout
    from ..schemes import QuantScheme

    return {c.__name__: c for c in (FloatQuantResult, GGUFLayerResult, LayerQuantResult, BlockLayout, GGUFParams,
                                     GroupLayout, QuantScheme)}


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return {"__dict__": {str(k): _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}}
    name = type(obj).__name__
    if name in _classes():
        fields = ({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj)
                  else vars(obj))
        return {"__obj__": name, "fields": {k: _encode(v, f"{key}.{k}", tensors) for k, v in fields.items()}}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} ({key})")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
    cls = _classes()[obj["__obj__"]]  # only our own result classes, never a name from the file
    return cls(**{k: _decode(v, tensors) for k, v in obj["fields"].items()})


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# ---- the checkpoint --------------------------------------------------------------------------------
@dataclasses.dataclass
class ResumedRun:
    """What a resumed run takes over: per done block its results and weights, the next inputs, the rng state."""

    done: list[str]
    results: dict[str, Any]          # layer name -> result object
    weights: dict[str, torch.Tensor]  # layer name -> fake-quantized module weight (module layout)
    fp_in: torch.Tensor
    q_in: Optional[torch.Tensor]
    rng_state: tuple
    block_stats: dict[str, dict]
    extra: dict


class BlockCheckpoint:
    """Writes and reads the work directory of one run (see the module docstring)."""

    def __init__(self, directory: Path, parts: dict[str, Any]):
        self.directory = Path(directory)
        self.parts = parts
        self.fingerprint = fingerprint(parts)
        self._state: Optional[dict] = None

    def load(self) -> Optional[ResumedRun]:
        """The resumable state, or None when there is none; ResumeError when it belongs to another run."""
        path = self.directory / STATE_NAME
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            diff = _differences(state.get("parts", {}), self.parts) or ["fingerprint"]
            raise ResumeError(f"cannot resume from {self.directory}: it was made with another {', '.join(diff)}; "
                              f"to start fresh delete {self.directory} (or pass --overwrite), or drop --resume "
                              "and use the original settings")
        results, weights = {}, {}
        for i, name in enumerate(state["done"]):
            tensors, meta = _load(self.directory / f"block-{i:04d}.safetensors")
            encoded = json.loads(meta["results"])
            results.update({n: _decode(v, tensors) for n, v in encoded.items()})
            weights.update({k.removeprefix("weight:"): v for k, v in tensors.items() if k.startswith("weight:")})
        inputs, _ = _load(self.directory / state["inputs"])
        v, internal, gauss = state["rng_state"]
        self._state = state
        return ResumedRun(state["done"], results, weights, inputs["fp_in"], inputs.get("q_in"),
                          (v, tuple(internal), gauss), state["block_stats"], state.get("extra", {}))

    def save_block(self, name: str, results: dict[str, Any], weights: dict[str, torch.Tensor], fp_in: torch.Tensor,
                   q_in: Optional[torch.Tensor], rng_state: tuple, block_stats: dict[str, dict],
                   extra: Optional[dict] = None) -> None:
        """Record that block `name` is done. results / weights: that block's layers only."""
        self.directory.mkdir(parents=True, exist_ok=True)
        state = self._state or {"version": STATE_VERSION, "fingerprint": self.fingerprint, "parts": self.parts,
                                "done": []}
        i = len(state["done"])
        tensors: dict[str, torch.Tensor] = {}
        encoded = {n: _encode(r, f"r:{n}", tensors) for n, r in results.items()}
        tensors.update({f"weight:{n}": w.detach().cpu().contiguous().clone() for n, w in weights.items()})
        _atomic_save(tensors, self.directory / f"block-{i:04d}.safetensors", {"results": json.dumps(encoded)})
        inputs = {"fp_in": fp_in.contiguous().cpu()}  # (the chains may live on the accelerator)
        if q_in is not None:
            inputs["q_in"] = q_in.contiguous().cpu()
        inputs_name = f"inputs-{i:04d}.safetensors"
        _atomic_save(inputs, self.directory / inputs_name)
        old_inputs = state.get("inputs")
        state = {**state, "done": [*state["done"], name], "inputs": inputs_name,
                 "rng_state": [rng_state[0], list(rng_state[1]), rng_state[2]], "block_stats": block_stats,
                 "extra": extra or {}}
        _atomic_write_bytes(self.directory / STATE_NAME, json.dumps(state, sort_keys=True).encode())  # last
        self._state = state
        if old_inputs and old_inputs != inputs_name:
            (self.directory / old_inputs).unlink(missing_ok=True)  # only after state.json no longer names it

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
