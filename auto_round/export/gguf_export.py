"""`gguf:<mix>` export: the quantized model as one llama.cpp GGUF file.

Every quantized layer (and the token embedding) is packed from its stored ggml parameters and codes, so
the file decodes to exactly the fake-quantized weights the tuning produced; 1-D tensors (norms, biases)
are F32; 2-D tensors the mix keeps in float use the mix's float type (f16 for quantized mixes, as
llama.cpp's fallback). Metadata, tokenizer and tensor names: export/gguf (our writer on gguf-py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..algorithms.gguf import GGUFLayerResult
from ..packing.gguf import pack_gguf
from ..schemes import GGML_FLOAT_TYPES, GGUF_MIXES
from .context import ExportContext
from .writer import ExportError

logger = logging.getLogger("auto_round")

GGUF_PREFIX = "gguf:"
# mix -> gguf.LlamaFileType member name
FILE_TYPES = {
    "q2_k_s": "MOSTLY_Q2_K_S", "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_l": "MOSTLY_Q3_K_L",
    "q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1", "q8_0": "MOSTLY_Q8_0", "bf16": "MOSTLY_BF16", "f16": "MOSTLY_F16", "f32": "ALL_F32",
}


def gguf_formats() -> list[str]:
    return [GGUF_PREFIX + mix for mix in GGUF_MIXES]


def mix_of_format(fmt: str) -> Optional[str]:
    return fmt[len(GGUF_PREFIX):] if fmt.startswith(GGUF_PREFIX) else None


def pack_gguf_layer(name: str, result: GGUFLayerResult) -> dict:
    """Immediate packing: the layer's ggml blocks (numpy uint8 [out, row bytes]) under 'blocks'."""
    if not isinstance(result, GGUFLayerResult) or result.codes is None:
        raise ExportError(f"{name}: no ggml codes to pack (not quantized to a ggml type)")
    return {"blocks": pack_gguf(result.codes, result.params), "qtype": result.params.qtype}


def _float_array(tensor: torch.Tensor, ggml_type: str) -> tuple[np.ndarray, str]:
    t = tensor.detach().cpu()
    if ggml_type == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), "BF16"
    if ggml_type == "f16":
        return t.to(torch.float16).numpy(), "F16"
    return t.to(torch.float32).numpy(), "F32"


def _tensors(ctx: ExportContext, mix: str) -> Iterator:
    """GGUFTensor per state-dict entry, produced one at a time (one converted tensor alive)."""
    import gguf

    from .gguf import GGUFTensor

    model = ctx.model
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    float_type = GGUF_MIXES[mix] if GGUF_MIXES[mix] in GGML_FLOAT_TYPES else "f16"
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    for name, tensor in model.state_dict(keep_vars=True).items():
        module_name, _, leaf = name.rpartition(".")
        if tied and head_name is not None and module_name == head_name:
            continue  # llama.cpp reads the tied output matrix from token_embd
        result = ctx.results.get(module_name)
        if leaf == "weight" and isinstance(result, GGUFLayerResult):
            packed = ctx.packed.get(module_name) or pack_gguf_layer(module_name, result)
            qtype = gguf.GGMLQuantizationType[packed["qtype"].upper()]
            yield GGUFTensor(name, packed["blocks"], qtype)
            continue
        if tensor.is_meta:
            raise ExportError(f"{name}: weight was released but not packed for GGUF")
        scheme = ctx.layer_schemes.get(module_name)
        ggml_type = "f32" if tensor.dim() < 2 else (scheme.gguf if scheme is not None and scheme.gguf in GGML_FLOAT_TYPES else float_type)
        data, qname = _float_array(tensor, ggml_type)
        yield GGUFTensor(name, data, gguf.GGMLQuantizationType[qname])


def save_gguf(ctx: ExportContext, out_dir: Path, fmt: str) -> dict:
    """Write <out_dir>/<Model>-<size>-<MIX>.gguf; returns {'file': path}."""
    import gguf

    from .gguf import gguf_file_name, write_gguf

    mix = mix_of_format(fmt)
    if mix is None or mix not in FILE_TYPES:
        raise ExportError(f"unknown GGUF format {fmt!r}; known: {', '.join(gguf_formats())}")
    model = ctx.model
    config = getattr(model.config, "text_config", None) or model.config
    n_params = sum(p.numel() for p in model.parameters() if not p.is_meta) + sum(
        int(np.prod(p.shape)) for p in model.parameters() if p.is_meta)
    name = gguf_file_name(model.config, mix.upper(), n_params)
    path = write_gguf(Path(out_dir) / name, model.config, ctx.tokenizer, _tensors(ctx, mix),
                      gguf.LlamaFileType[FILE_TYPES[mix]],
                      generation_config=getattr(model, "generation_config", None))
    logger.info("GGUF %s written: %s (%s)", mix, path.name, config.model_type)
    return {"file": str(path)}
