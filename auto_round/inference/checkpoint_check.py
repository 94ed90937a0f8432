"""Checks on a quantized checkpoint before anything in it is used (checkpoints are untrusted input).

    validate_checkpoint(folder)                 # config.json, quantization_config, safetensors headers
    validate_quantization_config(qconfig)       # types and ranges of every key the loader reads
    check_layer_tensors(model, tensors)         # the converted layers' buffers vs the stored tensors

`load_for_eval` runs the first before handing the folder to transformers; `convert_hf_model` (the hook
transformers calls for auto-round checkpoints) runs the second and, when the folder is local, the third once
the layers are swapped, so a config whose bits / group_size disagree with the stored tensors is refused
with the layer, the tensor and both shapes named (transformers would say only "size mismatch", or for a
missing tensor leave the buffer uninitialised). Everything raises CheckpointError (a ValueError).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from torch import nn

from ..model.loading import pickle_only_files, refuse_pickle_only
from ..model.safetensors_header import DTYPE_BYTES, CheckpointError, TensorEntry, checkpoint_tensors, is_json_int
from ..schemes import SchemeError, normalize_data_type

__all__ = ["CheckpointError", "UnsupportedCheckpointError", "validate_checkpoint", "validate_quantization_config",
           "check_layer_tensors", "read_quantization_config"]


class UnsupportedCheckpointError(CheckpointError, NotImplementedError):
    """A well-formed checkpoint this version cannot load (a packing, data type or option it does not implement)."""


def _layer_bits(v: Any) -> Optional[str]:
    if not is_json_int(v) or not (2 <= v <= 8 or v in (16, 32)):
        return "must be an integer in 2..8 (or 16 / 32 for a layer kept in floating point)"
    return None


def _bits(v: Any) -> Optional[str]:
    if not is_json_int(v) or not 2 <= v <= 8:
        return "must be an integer in 2..8"
    return None


def _act_bits(v: Any) -> Optional[str]:
    if not is_json_int(v) or not 2 <= v <= 32:
        return "must be an integer in 2..32 (16 or more: activations not quantized)"
    return None


def _layer_group(v: Any) -> Optional[str]:
    if not is_json_int(v) or v < -1 or v > 1 << 24:
        return "must be -1 (per channel), 0 (per tensor) or a positive integer"
    return None


def _group(v: Any) -> Optional[str]:
    if not is_json_int(v) or v == 0 or v < -1 or v > 1 << 24:
        return "must be -1 (per channel) or a positive integer"
    return None


def _block_size(v: Any) -> Optional[str]:
    if not (isinstance(v, list) and len(v) == 2 and all(is_json_int(x) and x > 0 for x in v)):
        return "must be a list of two positive integers"
    return None


def _data_type(v: Any) -> Optional[str]:
    if not isinstance(v, str):
        return "must be a string"
    try:
        normalize_data_type(v)
    except SchemeError as err:
        return str(err)
    return None


def _act_data_type(v: Any) -> Optional[str]:
    return None if isinstance(v, str) and len(v) < 64 else "must be a short string"


def _typed(*types: type) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        ok = isinstance(v, types) and (bool in types or not isinstance(v, bool))  # JSON true is not an int
        return None if ok else f"must be {' or '.join(t.__name__ for t in types)}"
    return check


def _names(v: Any) -> Optional[str]:
    """A comma string or a (possibly nested) list of strings."""
    if isinstance(v, str):
        return None
    if isinstance(v, list) and all(_names(x) is None for x in v):
        return None
    return "must be a string or a list of strings"


# keys a layer entry (extra_config values, GPTQ dynamic values) may carry, with their checks
LAYER_KEYS: dict[str, Callable[[Any], Optional[str]]] = {
    "bits": _layer_bits, "group_size": _layer_group, "sym": _typed(bool), "data_type": _data_type,
    "weight_block_size": _block_size, "act_bits": _act_bits, "act_group_size": _layer_group,
    "act_sym": _typed(bool), "act_dynamic": _typed(bool), "act_data_type": _act_data_type,
    "super_bits": _layer_bits, "super_group_size": _layer_group,
}
# the top level: transformers' AutoRoundConfig itself insists on bits 2..8 and group_size -1 or > 0
TOP_KEYS: dict[str, Callable[[Any], Optional[str]]] = {
    **LAYER_KEYS, "bits": _bits, "group_size": _group,
    "quant_method": _typed(str), "packing_format": _typed(str), "scale_dtype": _typed(str),
    "block_name_to_quantize": _names, "to_quant_block_names": _names, "modules_to_not_convert": _names,
    "modules_in_block_to_quantize": _names, "desc_act": _typed(bool), "static_groups": _typed(bool),
    "lm_head": _typed(bool), "model_free": _typed(bool), "checkpoint_format": _typed(str), "version": _typed(str),
    "w_bit": _bits, "q_group_size": _group, "zero_point": _typed(bool), "fmt": _typed(str),
    "activation_scheme": _typed(str), "extra_config": _typed(dict), "dynamic": _typed(dict),
}
OUR_METHODS = ("auto-round", "auto_round", "gptq", "awq")  # configs this package's loader reads


def _check_entry(entry: Mapping[str, Any], keys: Mapping[str, Callable[[Any], Optional[str]]], where: str,
                 not_null: tuple[str, ...] = ()) -> None:
    for key, check in keys.items():
        value = entry.get(key)
        if value is None:
            if key in entry and key in not_null:
                raise CheckpointError(f"quantization_config{where}: {key} is null; give a value or leave the key out")
            continue
        problem = check(value)
        if problem:
            raise CheckpointError(f"quantization_config{where}: {key}={_short(value)} {problem}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_quantization_config(qconfig: Mapping[str, Any]) -> None:
    """CheckpointError if a key the loader reads has the wrong type or an impossible value.

    Only auto-round / GPTQ / AWQ configs are checked in depth (other quant_methods belong to other loaders).
    Unknown keys are left alone (other tools add their own); every entry of extra_config / dynamic must be an
    object whose known keys pass the per-layer checks.
    """
    if not isinstance(qconfig, Mapping):
        raise CheckpointError(f"quantization_config is a {type(qconfig).__name__}, expected a JSON object")
    method = qconfig.get("quant_method")
    if not isinstance(method, str):
        raise CheckpointError(f"quantization_config.quant_method is {_short(method)}; expected a string such as "
                              "'auto-round', 'gptq' or 'awq'")
    if not any(m in method.lower() for m in OUR_METHODS):
        return  # another library's format (compressed-tensors, fp8, ...): its own loader checks it
    _check_entry(qconfig, TOP_KEYS, "", not_null=("bits", "group_size", "sym"))
    for table in ("extra_config", "dynamic"):
        for layer, entry in (qconfig.get(table) or {}).items():
            if not isinstance(entry, Mapping):
                if table == "dynamic" and entry is None:
                    continue
                raise CheckpointError(f"quantization_config.{table}[{_short(layer)}] is a {type(entry).__name__}, "
                                      "expected an object of per-layer settings")
            _check_entry(entry, LAYER_KEYS, f".{table}[{_short(layer)}]")


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path.name} in {path.parent} is not readable JSON ({err})") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path.name} in {path.parent} is a JSON {type(value).__name__}, expected an object")
    return value


def read_quantization_config(folder: "str | Path") -> Optional[dict[str, Any]]:
    """The folder's quantization_config (config.json's, else quantization_config.json), None if it has none."""
    folder = Path(folder)
    config = _read_json_object(folder / "config.json")
    qconfig = config.get("quantization_config")
    if qconfig is None and (folder / "quantization_config.json").is_file():
        qconfig = _read_json_object(folder / "quantization_config.json")
    if qconfig is not None and not isinstance(qconfig, dict):
        raise CheckpointError(f"config.json's quantization_config is a {type(qconfig).__name__}, expected an object")
    return qconfig


def validate_checkpoint(folder: "str | Path", *, allow_pickle: bool = False) -> dict[str, TensorEntry]:
    """Check a model folder before loading it; returns its tensors (from the safetensors headers).

    Refuses: no config.json, config / quantization_config that is not a JSON object or has bad values, weights
    only in pickle files (unless `allow_pickle`: unpickling can run code), malformed safetensors headers.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; it is not a model folder")
    qconfig = read_quantization_config(folder)
    if qconfig is not None:
        validate_quantization_config(qconfig)
    tensors = checkpoint_tensors(folder)
    if not tensors:
        if not allow_pickle:
            refuse_pickle_only(folder, CheckpointError)
        if not pickle_only_files(folder):
            raise CheckpointError(f"{folder} has no weight files (*.safetensors)")
    return tensors


# ------------------------------------------------------------------------------------- layer tensors vs file

_OPTIONAL_BUFFERS = ("g_idx",)  # GPTQ files may omit it; the registered default (i // group) is then right


def _stored_name(tensors: Mapping[str, TensorEntry], key: str) -> Optional[str]:
    """The file's name for a model key: as is, or without the first component (base-model checkpoints)."""
    if key in tensors:
        return key
    tail = key.split(".", 1)[-1]
    return tail if tail in tensors else None


def _dtype_problem(buffer_dtype, entry: TensorEntry) -> Optional[str]:
    if buffer_dtype.is_floating_point:
        is_fp8 = buffer_dtype.itemsize == 1
        if is_fp8 and not entry.dtype.startswith("F8"):
            return f"stored as {entry.dtype}, expected an FP8 type"
        if not is_fp8 and (entry.is_integer or entry.dtype.startswith("F8")):
            return f"stored as {entry.dtype}, expected a floating-point type"
        return None
    if not entry.is_integer or DTYPE_BYTES[entry.dtype] != buffer_dtype.itemsize:
        return f"stored as {entry.dtype}, expected an integer type of {buffer_dtype.itemsize} bytes"
    return None


def check_layer_tensors(model: nn.Module, tensors: Mapping[str, TensorEntry],
                        layer_types: Iterable[type] = ()) -> None:
    """Every persistent buffer of the quantized layers (modules of `layer_types`) against the stored tensors.

    Shapes must match exactly and dtypes by kind; a missing tensor is an error (its buffer would stay
    uninitialised). If no layer's tensors are found under any naming, nothing is checked (a naming scheme we
    do not know; transformers' own key mapping then decides).
    """
    layer_types = tuple(layer_types)
    problems: list[str] = []
    found_any = False
    for name, module in model.named_modules():
        if not isinstance(module, layer_types):
            continue
        for key, buffer in module.state_dict(keep_vars=True).items():
            stored = _stored_name(tensors, f"{name}.{key}")
            if stored is None:
                if key not in _OPTIONAL_BUFFERS:
                    problems.append(f"{name}.{key} is missing from the checkpoint")
                continue
            found_any = True
            entry = tensors[stored]
            if tuple(buffer.shape) != entry.shape:
                problems.append(f"{name}.{key} is {list(entry.shape)} in {entry.file}, but the quantization_config "
                                f"({_layer_desc(module)}) needs {list(buffer.shape)}")
            elif (problem := _dtype_problem(buffer.dtype, entry)) is not None:
                problems.append(f"{name}.{key} is {problem} ({entry.file})")
    if problems and found_any:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError("the checkpoint's tensors do not match its quantization_config: "
                              + "; ".join(problems[:3]) + more)


def _layer_desc(module: nn.Module) -> str:
    text = module.extra_repr() if hasattr(module, "extra_repr") else ""
    return re.sub(r"\s+", " ", text)[:160]
