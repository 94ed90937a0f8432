"""The hooks transformers' built-in AutoRoundQuantizer calls when it loads an auto-round checkpoint.

    target = infer_target_device(device_map)              -> "cpu" | "cuda" | "xpu" | ...
    model, backends = convert_hf_model(model, target)     before the weights load (model on the meta device)
    post_init(model, backends)                            after the weights load

convert_hf_model reads `model.config.quantization_config` (a dict or transformers' AutoRoundConfig), resolves the
scheme of every layer (layer_match.py) and swaps each quantized Linear / Conv1D for a QuantLinear whose buffers
have the checkpoint's packed shapes, so the loader fills them directly. GPTQ (desc_act false) and AWQ (gemm)
configs, which transformers turns into AutoRoundConfig when the user passes one, are mapped as the reference does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..layers import layer_shape
from ..model.safetensors_header import checkpoint_tensors
from .act_layers import FAKE_PACKING, FLOAT_PACKINGS, convert_fake_model, convert_float_model, install_act_quantizers
from .checkpoint_check import (CheckpointError, UnsupportedCheckpointError, check_layer_tensors,
                               validate_quantization_config)
from .layer_match import INT_DATA_TYPES, LayerQuantSpec, build_layer_specs, config_to_dict
from .qlinear import QuantLinear, packing_problem
from .qlinear_float import FloatQuantLinear

logger = logging.getLogger("auto_round")

TORCH_BACKEND = "auto_round:torch"


@dataclass(frozen=True)
class Packing:
    """How a checkpoint's packed tensors are laid out."""

    name: str  # the packing_format string
    layout: str  # "gptq" or "awq" (QuantLinear layout)
    zero_offset: int  # added to stored zero points: 1 for GPTQ v1
    g_idx: bool = False  # checkpoint carries a g_idx tensor per layer


# packing_format -> (layout, zero offset, g_idx). "auto_round:gptq" / "auto_round:awq" are the names transformers'
# AutoRoundConfig gives GPTQ / AWQ checkpoints (and its default when a config has no packing_format).
PACKING_FORMATS: dict[str, tuple[str, int, bool]] = {
    "auto_round:auto_gptq": ("gptq", 1, False),
    "auto_round:gptq": ("gptq", 1, False),
    "auto_round": ("gptq", 0, False),
    "auto_round:gptqmodel": ("gptq", 0, True),
    "auto_round:auto_awq": ("awq", 0, False),
    "auto_round:awq": ("awq", 0, False),
}
_SCALE_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
                 "float": torch.float32}


# ---------------------------------------------------------------------------------------------- device


def _device_type(value: Any) -> str:
    """'cuda:1' / torch.device / 0 / 'auto' -> a device type string."""
    if isinstance(value, torch.device):
        return value.type
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return _accelerator()  # bare indices name accelerator devices
    text = str(value).strip()
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return _accelerator()
    return text.split(":")[0]


def _accelerator() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def infer_target_device(device_map: Any = None) -> str:
    """Device type the quantized layers will run on, from a transformers `device_map`.

    None / "cpu" -> "cpu"; "auto" / an int -> the available accelerator (else "cpu"); "cuda:0" -> "cuda";
    a dict -> the first accelerator among its values ("cpu" when all are "cpu" / "disk").
    """
    if device_map is None:
        return "cpu"
    if isinstance(device_map, Mapping):
        types = [_device_type(v) for v in device_map.values()]
        return next((t for t in types if t not in ("cpu", "disk", "meta")), "cpu")
    return _device_type(device_map)


# ---------------------------------------------------------------------------------------------- config


def resolve_packing(qconfig: Mapping[str, Any]) -> Packing:
    """Packing of an auto-round / GPTQ / AWQ quantization_config; UnsupportedCheckpointError for what we cannot load."""
    method = str(qconfig.get("quant_method", "auto-round")).lower().replace("_", "-")
    gptq_origin = "gptq" in method or "desc_act" in qconfig  # AutoRoundConfig.from_dict keeps GPTQ's own keys
    if gptq_origin and qconfig.get("desc_act") and not qconfig.get("static_groups"):
        raise UnsupportedCheckpointError("GPTQ checkpoints with desc_act=True (act-order without static_groups) are not supported")
    if "gptq" in method:
        v2 = str(qconfig.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
        return Packing("auto_gptq", "gptq", 0 if v2 else 1, g_idx=True)
    if "awq" in method:
        if str(qconfig.get("version", "gemm")).lower() != "gemm":
            raise UnsupportedCheckpointError(f"AWQ version {qconfig.get('version')!r} is not supported; only 'gemm'")
        return Packing("auto_awq", "awq", 0)
    if "auto-round" not in method:
        raise UnsupportedCheckpointError(f"quant_method {qconfig.get('quant_method')!r} is not an auto-round, GPTQ or AWQ config")
    name = qconfig.get("packing_format") or "auto_round:gptq"  # AutoRoundConfig's own default
    if name not in PACKING_FORMATS:
        raise UnsupportedCheckpointError(
            f"packing_format {name!r} is not supported by this auto_round version; supported: {sorted(PACKING_FORMATS)}"
        )
    layout, offset, g_idx = PACKING_FORMATS[name]
    if gptq_origin and layout == "gptq":  # a GPTQ checkpoint loaded through AutoRoundConfig: it stores g_idx
        v2 = str(qconfig.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
        offset, g_idx = (0 if v2 else 1), True
    return Packing(name, layout, offset, g_idx)


def normalize_config(qconfig: Mapping[str, Any]) -> dict[str, Any]:
    """GPTQ / AWQ field names mapped onto auto-round ones (bits, group_size, sym)."""
    qc = dict(qconfig)
    method = str(qc.get("quant_method", "")).lower()
    if "awq" in method or qc.get("packing_format") in ("auto_round:awq",):
        qc.setdefault("bits", qc.get("w_bit", 4))
        qc.setdefault("group_size", qc.get("q_group_size", 128))
        if "zero_point" in qc:
            qc["sym"] = not qc["zero_point"]
    return qc


def _scale_dtype(qconfig: Mapping[str, Any]) -> torch.dtype:
    """dtype of the stored scales: fp16 unless the config says otherwise (e.g. "scale_dtype": "torch.float32")."""
    value = qconfig.get("scale_dtype")
    if value is None:
        return torch.float16
    key = str(value).replace("torch.", "").lower()
    if key not in _SCALE_DTYPES:
        raise UnsupportedCheckpointError(f"scale_dtype {value!r} is not supported")
    return _SCALE_DTYPES[key]


def _check_supported(qconfig: Mapping[str, Any], specs: Mapping[str, LayerQuantSpec]) -> None:
    act_bits = qconfig.get("act_bits")
    if act_bits is not None and int(act_bits) < 16:
        raise UnsupportedCheckpointError(f"activation quantization (act_bits={act_bits}) checkpoints are not supported yet")
    for name, spec in specs.items():
        if spec.data_type not in INT_DATA_TYPES:
            raise UnsupportedCheckpointError(
                f"layer {name}: data_type {spec.data_type!r} is not supported by this auto_round version (integer "
                "weight-only checkpoints only; MXFP/NVFP/FP8/GGUF are not implemented)"
            )
        if not 2 <= spec.bits <= 8:
            raise UnsupportedCheckpointError(f"layer {name}: {spec.bits}-bit weights are not supported (2..8 bits)")
        if spec.group_size == 0 or spec.group_size < -1:
            raise CheckpointError(f"layer {name}: group_size must be -1 or > 0, got {spec.group_size}")


# ---------------------------------------------------------------------------------------------- conversion


def _make_quant_linear(module: nn.Module, spec: LayerQuantSpec, packing: Packing, scale_dtype: torch.dtype,
                       pad_in_to_group: bool = False) -> QuantLinear:
    out_f, in_f = layer_shape(module)
    weight = module.weight
    dtype = weight.dtype if weight.is_floating_point() else torch.get_default_dtype()
    return QuantLinear(
        in_f, out_f, spec.bits, spec.group_size, zero_offset=packing.zero_offset,
        bias=getattr(module, "bias", None) is not None, dtype=dtype,
        layout=packing.layout, scale_dtype=scale_dtype, g_idx=packing.g_idx, device=weight.device,
        pad_in_to_group=pad_in_to_group,
    )


def convert_hf_model(model: nn.Module, target_device: str = "cpu") -> tuple[nn.Module, list[str]]:
    """Replace the checkpoint's quantized Linear/Conv1D layers by QuantLinear (in place, before weights load).

    Returns (model, backend names used), e.g. (model, ["auto_round:torch"]); [] if nothing was quantized.
    """
    raw = config_to_dict(getattr(model.config, "quantization_config", None))
    validate_quantization_config(raw)
    qconfig = normalize_config(raw)
    model, backends = _convert(model, qconfig, target_device)
    folder = _local_checkpoint(model)
    if folder is not None and backends:  # the stored tensors must fit the layers the config describes
        check_layer_tensors(model, checkpoint_tensors(folder), (QuantLinear, FloatQuantLinear))
    return model, backends


def _local_checkpoint(model: nn.Module) -> Optional[Path]:
    """The local folder transformers is loading from (config._name_or_path), None for hub ids / in-memory models."""
    name = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not name:
        return None
    path = Path(str(name)).expanduser()
    return path if path.is_dir() and (path / "config.json").is_file() else None


def _convert(model: nn.Module, qconfig: dict[str, Any], target_device: str) -> tuple[nn.Module, list[str]]:
    if qconfig.get("packing_format") == FAKE_PACKING:  # float weights; activation quantizers after loading
        model._auto_round_scale_dtype = _scale_dtype(qconfig)
        return convert_fake_model(model, qconfig)
    if qconfig.get("packing_format") in FLOAT_PACKINGS:  # MX / NVFP4 / FP8 weights, activation qdq in the layer
        return convert_float_model(model, qconfig, _scale_dtype(qconfig))
    packing = resolve_packing(qconfig)
    scale_dtype = _scale_dtype(qconfig)
    specs = build_layer_specs(model, qconfig)
    _check_supported(qconfig, specs)
    if not specs:
        logger.warning("auto_round: no layer is quantized according to quantization_config; the model stays float")
        return model, []
    replaced = 0
    for name, spec in specs.items():
        module = model.get_submodule(name)
        out_f, in_f = layer_shape(module)
        problem = packing_problem(in_f, out_f, spec.bits, spec.group_size, packing.layout)
        if problem:
            # The reference exporter keeps such layers in float; the checkpoint then holds `.weight` for them.
            logger.warning("auto_round: %s cannot be packed as %s (%s); kept as a float layer", name, packing.name, problem)
            continue
        # the reference's model-free RTN (iters 0, opt-RTN off) pads qweight of ragged layers to whole groups
        pad = bool(qconfig.get("model_free"))
        model.set_submodule(name, _make_quant_linear(module, spec, packing, scale_dtype, pad))
        replaced += 1
    if target_device not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        logger.warning("auto_round: untested target device %r for the torch backend", target_device)
    logger.info("auto_round: %d layers -> QuantLinear (%s, backend %s, device %s)",
                replaced, packing.name, TORCH_BACKEND, target_device)
    return model, [TORCH_BACKEND] if replaced else []


def post_init(model: nn.Module, used_backends: Optional[list[str]] = None) -> nn.Module:
    """After the weights are loaded: cache every QuantLinear's dequantized weight next to its packed buffers.

    Layers left on the meta device (accelerate offload: hooks bring the buffers in per forward) dequantize on the
    fly instead, so the offload still saves memory. transformers has already placed every buffer per device_map.
    """
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.post_init(cache=module.qweight.device.type != "meta")
        elif isinstance(module, FloatQuantLinear):
            module.post_init()
    install_act_quantizers(model, getattr(model, "_auto_round_scale_dtype", torch.float16))
    return model
