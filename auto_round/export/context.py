"""What an exporter receives: the quantized model and everything known about how it was quantized."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from ..algorithms.tunable import LayerQuantResult
from ..model.source_dtypes import SourceDtypes
from ..schemes import QuantScheme


@dataclass
class ExportContext:
    """model: the fake-quantized model (quantized layers hold their qdq weights).

    results: layer name -> codes / scales / zero points of every quantized layer.
    layer_schemes: scheme of every candidate layer (blocks and lm_head), FP_SCHEME for fp ones.
    tuning: tuning settings recorded in quantization_config (iters, lr, nsamples, ...).
    packing / packed: set by immediate packing; the fake-quantized weights of `packed` layers are gone
        (meta tensors), so only the format they were packed for can be written.
    """

    model: nn.Module
    tokenizer: Any
    results: dict[str, LayerQuantResult]
    layer_schemes: dict[str, QuantScheme]
    scheme: QuantScheme
    block_groups: list[str]
    tuning: dict[str, Any] = field(default_factory=dict)
    max_shard_size: "int | str" = "5GB"
    scale_dtype_name: str = "torch.float16"
    extra: Optional[dict[str, Any]] = None
    # immediate packing (low_cpu_mem_usage): the packing fixed before tuning, and layer name -> its
    # packed tensors for the layers packed as soon as their block was done (their weights are released)
    packing: Optional[str] = None
    packed: dict[str, dict[str, Any]] = field(default_factory=dict)
    packed_for: Optional[str] = None  # the format string the packed tensors were made for
    # what the manifest records about the run: seed, scheme, tuning settings, calibration hash
    run_info: dict[str, Any] = field(default_factory=dict)
    # files written next to the checkpoint (name -> text), e.g. autoscheme_plan.json
    extra_files: dict[str, str] = field(default_factory=dict)
    # the dtypes the source checkpoint stores its tensors in: unquantized tensors are written back in them
    # (None: as they are in memory, e.g. a model passed as a module or loaded in an explicit model_dtype)
    source_dtypes: Optional[SourceDtypes] = None

    def in_block(self, name: str) -> bool:
        return any(name.startswith(g + ".") for g in self.block_groups)
