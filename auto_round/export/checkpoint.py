"""What every packed-integer export shares: the state dict with packed layers, and the files around it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..algorithms.tunable import LayerQuantResult
from ..model.source_dtypes import SourceDtypes
from .context import ExportContext
from .writer import ExportError, save_generation_config, save_tokenizer, tied_parameter_names, write_safetensors

PackFn = Callable[[str, LayerQuantResult], dict[str, torch.Tensor]]


def scales_and_zeros(name: str, res: LayerQuantResult, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales [n_groups, out] in scale_dtype, zero points int64 [n_groups, out]) of a layer result.

    Per-tensor results ([1, 1]) are repeated per output channel, the layout every loader expects.
    Raises ExportError when the layer's codes were already released (packed during quantization).
    """
    if res.codes is None:
        raise ExportError(f"{name}: its integer codes were released after packing; it cannot be packed again")
    out_f = res.layout.out_features

    def per_output(t: torch.Tensor) -> torch.Tensor:
        return t.expand(out_f, t.shape[1]) if t.shape[0] == 1 else t

    scales = per_output(res.scale).t().contiguous().to(scale_dtype)
    zeros = per_output(res.zero_point).t().round().to(torch.int64).contiguous()
    return scales, zeros


def group_index(res: LayerQuantResult) -> torch.Tensor:
    """GPTQ's g_idx: the group of every input channel, int32 [in] (no act-order, so i // group)."""
    in_f = res.layout.in_features
    group = res.scheme.group_size if res.scheme.group_size > 0 else in_f
    return (torch.arange(in_f, dtype=torch.int32) // group).to(torch.int32)


def quantized_state_dict(ctx: ExportContext, pack: PackFn, float_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized layer's weight replaced by its packed tensors.

    Layers packed during quantization (ctx.packed) are used as they are. float_dtype casts every other
    floating tensor (embeddings, norms, biases, fp layers), as GPTQ/AWQ checkpoints are fp16 throughout;
    without it they go back to the dtypes the source checkpoint stored them in (ctx.source_dtypes), whatever
    dtype the model was tuned in.
    """
    tied = tied_parameter_names(ctx.model)
    state = {k: v for k, v in ctx.model.state_dict().items() if k not in tied}
    packed_keys: set[str] = set()
    for name, result in ctx.results.items():
        weight_key = f"{name}.weight"
        if weight_key not in state:
            raise ExportError(f"quantized layer {name} has no weight in the state dict (tied or renamed?)")
        del state[weight_key]
        tensors = ctx.packed.get(name)
        tensors = tensors if tensors is not None else pack(name, result)
        state.update(tensors)
        packed_keys.update(tensors)
    dtypes = SourceDtypes(float_dtype) if float_dtype is not None else ctx.source_dtypes
    return dtypes.cast(state, skip=packed_keys) if dtypes is not None else state


def write_checkpoint(ctx: ExportContext, directory: Path, state: dict[str, torch.Tensor], qconfig: dict[str, Any],
                     dtype: Optional[torch.dtype] = None) -> None:
    """config.json (with quantization_config, and `dtype` when given, else the source checkpoint's declared
    dtype), quantization_config.json, the safetensors shards, generation_config.json and the tokenizer."""
    config = copy.deepcopy(ctx.model.config)
    config.quantization_config = qconfig
    if dtype is None and ctx.source_dtypes is not None:
        dtype = ctx.source_dtypes.config_dtype
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(str(directory))
    (directory / "quantization_config.json").write_text(json.dumps(qconfig, indent=2))
    write_safetensors(state, directory, ctx.max_shard_size)
    save_generation_config(ctx.model, directory)
    save_tokenizer(ctx.tokenizer, directory)
