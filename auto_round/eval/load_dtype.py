"""How a saved model is loaded for evaluation: its dtype, the quantization_config it declares, and the loading
kwargs compressed-tensors checkpoints need where transformers' compressed mode fails (asymmetric packed integer
weights; packed weights of architectures whose weight init reads `module.weight`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from ..export.llm_compressor_float import BF16_ONLY_FORMATS

logger = logging.getLogger("auto_round")


def quantization_config(folder: Path) -> dict:
    """config.json's quantization_config ({} when absent or unreadable)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return config.get("quantization_config") or {}


def _compressed_tensors_config(folder: Path) -> dict:
    """quantization_config of a compressed-tensors checkpoint ({} for any other)."""
    qc = quantization_config(folder)
    return qc if str(qc.get("quant_method", "")).lower() == "compressed-tensors" else {}


def _bf16_decompressed_format(folder: Path) -> Optional[str]:
    """The compressed-tensors format of `folder` that only runs in bf16 (BF16_ONLY_FORMATS: an fp32 model fails
    at its first matmul), else None."""
    qc = _compressed_tensors_config(folder)
    groups = qc.get("config_groups") or {}
    formats = [qc.get("format")] + [g.get("format") for g in groups.values() if isinstance(g, dict)]
    return next((f for f in formats if f in BF16_ONLY_FORMATS), None)


def eval_dtype(path: Path, dtype, device: str):
    """The dtype to load `path` in: the caller's, else fp32 on CPU / the checkpoint's own elsewhere; bf16 for
    a compressed-tensors format that only runs in bf16 (an explicit other dtype is refused, naming it)."""
    from ..model.loading import ModelLoadError, parse_dtype

    wanted = parse_dtype(dtype)
    bf16_only = _bf16_decompressed_format(path) if path.is_dir() else None
    if bf16_only is None:
        return wanted or (torch.float32 if device == "cpu" else "auto")
    if wanted not in (None, torch.bfloat16):
        raise ModelLoadError(f"{path} holds compressed-tensors {bf16_only!r} weights, which compressed-tensors "
                             f"decompresses to bf16 only; evaluate it in bf16 (dtype='bf16', CLI "
                             f"--eval_model_dtype bf16), not {wanted}")
    if wanted is None:
        logger.info("%s: compressed-tensors %s weights decompress to bf16: evaluating in bf16", path, bf16_only)
    return torch.bfloat16


def _asym_packed_groups(qc: dict) -> list[str]:
    """Names of the config groups with asymmetric pack-quantized integer weights."""
    groups = qc.get("config_groups") or {}
    return [name for name, g in groups.items() if isinstance(g, dict)
            and (g.get("format") or qc.get("format")) in ("pack-quantized", "mixed-precision")
            and (g.get("weights") or {}).get("symmetric") is False and (g.get("weights") or {}).get("type") == "int"]


def _decompression_blocker(qc: dict) -> Optional[str]:
    """What decompressed loading (run_compressed=False) would get wrong in a compressed-tensors config: it uses one
    group's scheme for every layer and drops activation quantization. None when neither applies."""
    groups = qc.get("config_groups") or {}
    if len(groups) > 1:
        return "several config groups (mixed precision)"
    if any(g.get("input_activations") for g in groups.values() if isinstance(g, dict)):
        return "quantized activations"
    return None


def compressed_tensors_kwargs(folder: Path) -> dict:
    """from_pretrained kwargs for a compressed-tensors checkpoint with asymmetric pack-quantized weights ({} for
    any other checkpoint).

    compressed-tensors writes their zero points packed ([out * bits / 32, n_groups], what vLLM reads), while
    transformers' compressed-mode loading sizes them unpacked and fails ("size mismatch ... weight_zero_point"),
    for llm-compressor's own files as for ours. Decompressed loading (run_compressed=False) reads them; it drops
    activation quantization and decompresses every layer with one group's scheme, so checkpoints that quantize
    activations or mix groups are refused with a ModelLoadError instead of evaluated wrongly."""
    from ..model.loading import ModelLoadError

    qc = _compressed_tensors_config(folder)
    if not _asym_packed_groups(qc):
        return {}
    groups = qc.get("config_groups") or {}
    why = _decompression_blocker(qc)
    if why is not None:
        raise ModelLoadError(f"{folder} holds asymmetric pack-quantized weights with {why}: transformers cannot load "
                             "that (compressed mode mis-sizes the packed zero points, decompressed mode "
                             f"{'uses one scheme for all layers' if len(groups) > 1 else 'drops the activation quantization'}); "
                             "vLLM loads it. To evaluate here, export format 'auto_round' or 'fake' as well")
    from transformers import CompressedTensorsConfig

    logger.info("%s: asymmetric pack-quantized weights: loading decompressed (run_compressed=False)", folder)
    return {"quantization_config": CompressedTensorsConfig(run_compressed=False)}


def decompressed_retry_kwargs(folder: Path, err: AttributeError) -> dict:
    """from_pretrained kwargs for loading a compressed-tensors checkpoint decompressed after its compressed-mode
    load failed with `err`; re-raises `err` when that is not the failure below.

    transformers' weight init of some architectures reads `module.weight` of a Linear subclass (Falcon's
    FalconLinear, GPTBigCode's attention Linear) after compressed-tensors has replaced it by `weight_packed`
    (pack-quantized, MXFP4, NVFP4): "'FalconLinear' object has no attribute 'weight'", for llm-compressor's own
    files too. Decompressed loading has no such module; it drops activation quantization and uses one group's
    scheme for every layer, so such checkpoints are refused with a ModelLoadError instead of evaluated wrongly."""
    from ..model.loading import ModelLoadError

    qc = _compressed_tensors_config(folder)
    if not qc or "has no attribute 'weight'" not in str(err):
        raise err
    why = _decompression_blocker(qc)
    if why is not None:
        raise ModelLoadError(f"transformers cannot load {folder} in compressed mode for this architecture ({err}), "
                             f"and decompressed loading would misread its {why}; vLLM loads it. To evaluate here, "
                             "export format 'auto_round' or 'fake' as well") from err
    from transformers import CompressedTensorsConfig

    logger.info("%s: compressed-mode loading fails for this architecture (%s): loading decompressed", folder, err)
    return {"quantization_config": CompressedTensorsConfig(run_compressed=False)}
