"""Write one GGUF file (llama.cpp's model format) from a stream of tensors, on gguf-py's `GGUFWriter`.

Layout written (GGUF v3): header, metadata (general.*, `{arch}.*` hyper-parameters, tokenizer.*), tensor
infos, then the tensor data, each aligned to 32 bytes. The header needs every tensor's name, type and
shape before the first data byte, while the tensors arrive one at a time; so each converted tensor is
appended to a temporary file next to the output as soon as it arrives (gguf-py's temp-file mode) and
released, and the data is copied behind the header at the end: memory holds one tensor at a time, disk
holds the data twice until the copy is done. The file appears under its final name only when complete.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import gguf
import numpy as np

from ..writer import ExportError
from .arch import (ArchSpec, arch_spec, extra_tensors, gguf_tensor_name, is_norm, permute_rows, qk_heads, text_config,
                   write_hparams)
from .vocab import write_tokenizer

logger = logging.getLogger("auto_round")

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


@dataclass
class GGUFTensor:
    """One state-dict entry to write.

    hf_name: the transformers name ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight", ...).
    data: F32 / F16: a float array in the HF shape [out, in] (converted to qtype if another float dtype);
          BF16: uint16 raw bf16 bits in the HF shape (or a float array, rounded to bf16 here);
          quantized: uint8 [out, (in // block) * type_size], packed ggml blocks, one HF output row per row
          (or a float array, quantized here by gguf-py where it implements qtype).
    qtype: the ggml type stored in the file.
    """

    hf_name: str
    data: np.ndarray
    qtype: gguf.GGMLQuantizationType


def _model_id(config, model_name: Optional[str]) -> Optional[str]:
    if model_name:
        return model_name
    name_or_path = str(getattr(config, "_name_or_path", "") or "").rstrip("/\\")
    return Path(name_or_path).name or None


def _file_type_name(file_type: gguf.LlamaFileType) -> str:
    """MOSTLY_Q4_K_M -> 'Q4_K_M', ALL_F32 -> 'F32' (llama.cpp's spelling in file names)."""
    return file_type.name.partition("_")[2] or file_type.name


def _name_parts(config, n_params: int, model_name: Optional[str]):
    """(name, basename, finetune, version, size_label) as llama.cpp derives them from the model id."""
    name, _org, basename, finetune, version, size = gguf.Metadata.get_model_id_components(
        _model_id(config, model_name), n_params)
    if size is None and n_params > 0:
        size = gguf.size_label(n_params, n_params, 0, 0)
    return name, basename, finetune, version, size


def gguf_file_name(config, file_type_name: str, n_params: int, model_name: Optional[str] = None) -> str:
    """llama.cpp's default file name, e.g. 'SmolLM2-135M-Instruct-Q4_K_M.gguf', 'Qwen3-8B-Q4_K_M.gguf'.

    The model id is `model_name` or the last component of `config._name_or_path`; the size comes from the
    id when it states one ("8B"), else from n_params.
    """
    name, basename, finetune, version, size = _name_parts(config, n_params, model_name)
    return gguf.naming_convention(name, basename, finetune, version, size, file_type_name) + ".gguf"


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _prepare(t: GGUFTensor, gguf_name: str, spec: ArchSpec, cfg) -> tuple[np.ndarray, Optional[Q]]:
    """The array to store and the raw type to pass gguf-py (None: inferred from a float32/16 dtype).

    Applies the architecture's transforms: q/k row permutation (llama/mistral; rows only, so packed rows
    too) and the Gemma norm shift (float data only).
    """
    qtype, data = Q(t.qtype), np.asarray(t.data)
    if qtype == Q.BF16 and data.dtype == np.uint8:  # bf16 as raw bytes (gguf.quants.quantize's output)
        data = np.ascontiguousarray(data).view(np.uint16)
    heads = qk_heads(cfg, t.hf_name) if spec.permute_qk else None
    shift = spec.norm_shift if is_norm(gguf_name) else 0.0
    packed = data.dtype == np.uint8 or (qtype == Q.BF16 and data.dtype == np.uint16)
    if packed:
        if shift:
            if qtype != Q.BF16:
                raise ExportError(f"{t.hf_name}: norm weights must be float to apply the +{shift} shift, "
                                  f"got {qtype.name}")
            data, packed = _bf16_to_f32(data), False
        elif qtype not in FLOAT_TYPES and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][1]:
            raise ExportError(f"{t.hf_name}: {data.shape[-1]} bytes per row is not a whole number of "
                              f"{qtype.name} blocks ({gguf.GGML_QUANT_SIZES[qtype][1]} bytes each)")
        elif qtype in (Q.F32, Q.F16):
            raise ExportError(f"{t.hf_name}: {qtype.name} data must be a float array, got {data.dtype}")
    elif data.dtype.kind != "f":
        raise ExportError(f"{t.hf_name}: expected a float array or packed uint8 blocks for {qtype.name}, "
                          f"got {data.dtype}")
    if heads is not None:
        data = permute_rows(data, heads)
    if packed:
        return data, qtype
    if shift:
        data = data.astype(np.float32) + np.float32(shift)
    if qtype == Q.F32:
        return data.astype(np.float32, copy=False), None
    if qtype == Q.F16:
        return data.astype(np.float16, copy=False), None
    try:
        return gguf.quants.quantize(data.astype(np.float32, copy=False), qtype), qtype
    except (NotImplementedError, gguf.QuantError) as e:
        raise ExportError(f"{t.hf_name}: cannot quantize {tuple(data.shape)} float data to {qtype.name} here ({e}); "
                          "pass packed ggml blocks") from e


def _add_tensors(writer: gguf.GGUFWriter, config, spec: ArchSpec, tensors: Iterable[GGUFTensor]) -> bool:
    """Convert and spill every tensor; returns whether any is quantized."""
    cfg = text_config(config)
    tied = bool(getattr(config, "tie_word_embeddings", getattr(cfg, "tie_word_embeddings", False)))
    seen: dict[str, str] = {}
    quantized = False
    for t in tensors:
        name = gguf_tensor_name(config, t.hf_name)
        if name is None:
            continue
        if tied and name == "output.weight":
            # llama.cpp (and transformers' GGUF loader) reuse token_embd when output.weight is absent
            logger.debug("GGUF: %s not written, the embeddings are tied", t.hf_name)
            continue
        if name in seen:
            raise ExportError(f"tensors {seen[name]!r} and {t.hf_name!r} both map to GGUF tensor {name!r}")
        data, raw = _prepare(t, name, spec, cfg)
        writer.add_tensor(name, data, raw_dtype=raw)  # spilled to the temp file, not kept
        del data
        seen[name] = t.hf_name
        quantized |= Q(t.qtype) not in FLOAT_TYPES
    for name, data in extra_tensors(config):
        writer.add_tensor(name, data)
        seen[name] = name
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in seen]
    missing += [f"blk.{i}.*" for i in range(cfg.num_hidden_layers) if not any(n.startswith(f"blk.{i}.") for n in seen)]
    if missing:
        raise ExportError(f"GGUF export: no tensors given for {', '.join(missing[:8])}")
    return quantized


def _add_general(writer: gguf.GGUFWriter, config, file_type: gguf.LlamaFileType, quantized: bool,
                 model_name: Optional[str]) -> None:
    total = writer.get_total_parameter_count()[0]
    name, basename, finetune, version, size = _name_parts(config, total, model_name)
    writer.add_type(gguf.GGUFType.MODEL)
    for value, add in ((name, writer.add_name), (basename, writer.add_basename), (finetune, writer.add_finetune),
                       (version, writer.add_version), (size, writer.add_size_label)):
        if value:
            add(value)
    writer.add_file_type(int(file_type))
    if quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(path: Path, config, tokenizer, tensors: Iterable[GGUFTensor], file_type: gguf.LlamaFileType, *,
               model_name: Optional[str] = None, generation_config=None) -> Path:
    """Write the model as one GGUF file; returns its path.

    path: the .gguf file, or a directory (anything not ending in .gguf) to put it in under `gguf_file_name(...)`.
    config: the transformers config of the causal LM (Gemma3's multimodal config: its text_config is used);
    tokenizer: a transformers fast tokenizer, or None (no vocabulary, with a warning).
    tensors: consumed once, one at a time (see the module docstring for memory use).
    Architecture and tokenizer are checked before the first tensor is read.
    """
    spec = arch_spec(config)
    file_type = gguf.LlamaFileType(file_type)
    path = Path(path)
    auto_name = path.is_dir() or path.suffix.lower() != ".gguf"
    out_dir = path if auto_name else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[spec.gguf_arch], use_temp_file=True)
    # Spill the tensor data next to the output (same disk), not into a RAM-backed /tmp.
    writer.temp_file = tempfile.TemporaryFile(dir=out_dir, prefix=".gguf-data-")
    partial = None
    try:
        write_hparams(writer, config)
        write_tokenizer(writer, tokenizer, text_config(config), generation_config)
        quantized = _add_tensors(writer, config, spec, tensors)
        _add_general(writer, config, file_type, quantized, model_name)
        if auto_name:
            total = writer.get_total_parameter_count()[0]
            path = path / gguf_file_name(config, _file_type_name(file_type), total, model_name)
        partial = path.with_name(f".{path.name}.partial")
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        if partial is not None and partial.exists():
            partial.unlink()
        raise
    finally:
        if writer.temp_file is not None and not writer.temp_file.closed:
            writer.temp_file.close()
    logger.info("GGUF written: %s", path)
    return path
