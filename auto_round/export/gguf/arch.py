"""Per-architecture data for the GGUF writer: HF model_type -> llama.cpp architecture, hyper-parameters,
tensor names and the tensor transforms llama.cpp's converter applies.

One `ArchSpec` row per supported transformers `model_type`; everything else is generic and reads the
transformers config:

    model_type    gguf arch   transforms
    llama         llama       q_proj / k_proj rows permuted into llama.cpp's rotary order
    mistral       llama       same as llama (llama.cpp runs Mistral as llama)
    qwen2         qwen2       -
    qwen3         qwen3       -
    gemma         gemma       every `*norm.weight` stored as 1 + w
    phi           phi2        - (Phi-1 / 1.5 / 2: LayerNorm with biases, partial rotary, parallel attention / MLP)
    phi3          phi3        - (qkv_proj / gate_up_proj are llama.cpp's fused attn_qkv / ffn_up as they are)
    gemma2        gemma2      every `*norm.weight` stored as 1 + w; attention and final logit softcapping
    olmo2         olmo2       - (q_norm / k_norm over the whole projection, post-attention / post-ffn norms)
    cohere        command-r   - (LayerNorm epsilon and logit scale; q/k norms (Command R+) refused)
    starcoder2    starcoder2  - (LayerNorm with biases, biased projections; its sliding window is warned)
    stablelm      stablelm    - (LayerNorm, partial rotary; parallel residual / q-k norms refused)
    granite       granite     q/k rows permuted as llama; embedding / residual / attention / logit multipliers
    smollm3       smollm3     q/k rows permuted as llama; NoPE layers must be llama.cpp's every 4th
    gemma3_text   gemma3      every `*norm.weight` stored as 1 + w (Gemma3RMSNorm scales by 1 + w)
    gemma3        gemma3      the text model of the multimodal config (vision tower not written)

Hyper-parameters are written under llama.cpp's key names (`{arch}.context_length`, ...), the ones its
loader (src/llama-model.cpp, src/models/*.cpp) reads for that architecture.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import gguf
import numpy as np

from ..writer import ExportError

logger = logging.getLogger("auto_round")


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers architecture maps onto a llama.cpp one.

    gguf_arch: llama.cpp's architecture; permute_qk: reorder q/k rows from HF's rotate-half layout to
    llama.cpp's interleaved one (llama/mistral only); norm_shift: added to every `*norm.weight`;
    extra_hparams: arch-specific keys (sliding window, softcapping, ...); rope_freqs_tensor: llama3-type
    rope scaling is stored as a `rope_freqs.weight` tensor of per-frequency factors (llama arch only);
    attn_softcapping: the architecture's attention can apply the config's attn_logit_softcapping.
    """

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_shift: float = 0.0
    extra_hparams: Optional[Callable[[gguf.GGUFWriter, Any], None]] = None
    rope_freqs_tensor: bool = False
    attn_softcapping: bool = False  # llama.cpp's arch applies attn_logit_softcapping (gemma2; gemma3 has none)


def _gemma3_hparams(writer: gguf.GGUFWriter, cfg) -> None:
    """Sliding-window attention on some layers (with its own rope base), optional final softcap."""
    n_layer = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if window:
        writer.add_sliding_window(int(window))
        # Per-layer flags (True = sliding) rather than llama.cpp's default "5 sliding, 1 full": exact for
        # any layer_types list.
        writer.add_sliding_window_pattern(_sliding_layers(cfg, n_layer))
        swa = _rope_params(cfg)[1]
        swa_theta = (swa or {}).get("rope_theta", getattr(cfg, "rope_local_base_freq", None))
        if swa_theta is not None:
            writer.add_rope_freq_base_swa(float(swa_theta))
    if (cap := getattr(cfg, "final_logit_softcapping", None)):
        writer.add_final_logit_softcapping(float(cap))
    _warn_attention_scale("gemma3", cfg, 62)


def _gemma2_hparams(writer: gguf.GGUFWriter, cfg) -> None:
    """Sliding-window attention on every other layer (llama.cpp hard-codes the pattern: layer 0 sliding, 1 full,
    transformers' default layer_types), attention and final logit softcapping."""
    if (window := getattr(cfg, "sliding_window", None)):
        writer.add_sliding_window(int(window))
        if _sliding_layers(cfg, cfg.num_hidden_layers) != [i % 2 == 0 for i in range(cfg.num_hidden_layers)]:
            raise ExportError("GGUF export: llama.cpp runs gemma2 with sliding attention on even layers and full "
                              "attention on odd ones; this model's layer_types differ")
    if (cap := getattr(cfg, "attn_logit_softcapping", None)):
        writer.add_attn_logit_softcapping(float(cap))
    if (cap := getattr(cfg, "final_logit_softcapping", None)):
        writer.add_final_logit_softcapping(float(cap))
    _warn_attention_scale("gemma2", cfg, 46)


def _phi3_hparams(writer: gguf.GGUFWriter, cfg) -> None:
    """Phi-3's optional sliding window, written as llama.cpp's converter does (and warned: see below)."""
    if (window := getattr(cfg, "sliding_window", None)):
        writer.add_sliding_window(int(window))
        _warn_ignored_sliding_window("phi3", cfg)


def _starcoder2_hparams(writer: gguf.GGUFWriter, cfg) -> None:
    _layer_norm_hparams(writer, cfg)
    _warn_ignored_sliding_window("starcoder2", cfg)


def _warn_ignored_sliding_window(arch: str, cfg) -> None:
    """The llama.cpp of llama-cpp-python 0.3.16 runs Phi-3 and StarCoder2 without their sliding window (its
    logits equal the window-less model's, measured on tiny models): warned when the window is shorter than
    the context."""
    window = getattr(cfg, "sliding_window", None)
    if window and int(window) < int(getattr(cfg, "max_position_embeddings", 0) or 0):
        logger.warning("%s: llama.cpp (llama-cpp-python 0.3.16) attends to the whole context instead of the sliding "
                       "window of %d tokens: beyond it its outputs differ from transformers'", arch, window)


def _cohere_hparams(writer: gguf.GGUFWriter, cfg) -> None:
    """Command-R: LayerNorm (not RMS) epsilon and the logit scale; the optional q/k norms are not supported."""
    if getattr(cfg, "use_qk_norm", False):
        raise ExportError("GGUF export: cohere with use_qk_norm (Command R+) is not supported yet")
    _layer_norm_hparams(writer, cfg)
    writer.add_logit_scale(float(cfg.logit_scale))


def _layer_norm_hparams(writer: gguf.GGUFWriter, cfg) -> None:
    """Architectures with LayerNorm instead of RMSNorm: its epsilon."""
    eps = getattr(cfg, "norm_epsilon", None) or getattr(cfg, "layer_norm_eps", None)
    writer.add_layer_norm_eps(float(eps if eps is not None else 1e-5))


def _stablelm_hparams(writer: gguf.GGUFWriter, cfg) -> None:
    """StableLM: LayerNorm; its optional parallel residual and per-head q/k norms are not supported."""
    if getattr(cfg, "use_parallel_residual", False) or getattr(cfg, "qk_layernorm", False):
        raise ExportError("GGUF export: stablelm with use_parallel_residual or qk_layernorm is not supported yet")
    _layer_norm_hparams(writer, cfg)


def _granite_hparams(writer: gguf.GGUFWriter, cfg) -> None:
    """Granite's four multipliers (embedding, residual, attention scale, logits divisor)."""
    writer.add_embedding_scale(float(cfg.embedding_multiplier))
    writer.add_residual_scale(float(cfg.residual_multiplier))
    writer.add_attention_scale(float(cfg.attention_multiplier))
    writer.add_logit_scale(float(cfg.logits_scaling))


def _smollm3_hparams(writer: gguf.GGUFWriter, cfg) -> None:
    """llama.cpp hard-codes SmolLM3's NoPE layers: every 4th (3, 7, ...) has no rotary embedding."""
    n_layer = cfg.num_hidden_layers
    use_rope = list(getattr(cfg, "no_rope_layers", None) or [1] * n_layer)[:n_layer]  # 1 = rope, 0 = NoPE
    if use_rope != [int((i + 1) % 4 != 0) for i in range(n_layer)]:
        raise ExportError("GGUF export: llama.cpp runs smollm3 without rotary embedding on every 4th layer exactly; "
                          "this model's no_rope_layers differ")


def _warn_attention_scale(arch: str, cfg, big_n_layer: int) -> None:
    """llama.cpp hard-codes Gemma's attention scale: 1/sqrt(n_embd/n_head) for the biggest model (27B: 62 layers
    for gemma3, 46 for gemma2), else 1/sqrt(head_dim). Say so when the model's query_pre_attn_scalar disagrees."""
    qpas = getattr(cfg, "query_pre_attn_scalar", None)
    used = cfg.hidden_size / cfg.num_attention_heads if cfg.num_hidden_layers == big_n_layer else _head_dim(cfg)
    if qpas is not None and not math.isclose(float(qpas), float(used)):
        logger.warning("%s query_pre_attn_scalar=%s but llama.cpp scales attention by 1/sqrt(%s); "
                       "llama.cpp's outputs will differ from transformers' for this model", arch, qpas, used)


def _sliding_layers(cfg, n_layer: int) -> list[bool]:
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return [t == "sliding_attention" for t in layer_types][:n_layer]
    pattern = int(getattr(cfg, "sliding_window_pattern", 6) or 6)
    return [(i + 1) % pattern != 0 for i in range(n_layer)]


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, rope_freqs_tensor=True),
    "mistral": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, rope_freqs_tensor=True),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2),
    "qwen3": ArchSpec(gguf.MODEL_ARCH.QWEN3),
    "gemma": ArchSpec(gguf.MODEL_ARCH.GEMMA, norm_shift=1.0),
    "phi": ArchSpec(gguf.MODEL_ARCH.PHI2, extra_hparams=_layer_norm_hparams),
    "gemma2": ArchSpec(gguf.MODEL_ARCH.GEMMA2, norm_shift=1.0, extra_hparams=_gemma2_hparams,
                       attn_softcapping=True),
    "phi3": ArchSpec(gguf.MODEL_ARCH.PHI3, extra_hparams=_phi3_hparams),
    "olmo2": ArchSpec(gguf.MODEL_ARCH.OLMO2),
    "cohere": ArchSpec(gguf.MODEL_ARCH.COMMAND_R, extra_hparams=_cohere_hparams),
    "starcoder2": ArchSpec(gguf.MODEL_ARCH.STARCODER2, extra_hparams=_starcoder2_hparams),
    "stablelm": ArchSpec(gguf.MODEL_ARCH.STABLELM, extra_hparams=_stablelm_hparams),
    "granite": ArchSpec(gguf.MODEL_ARCH.GRANITE, permute_qk=True, extra_hparams=_granite_hparams),
    "smollm3": ArchSpec(gguf.MODEL_ARCH.SMOLLM3, permute_qk=True, extra_hparams=_smollm3_hparams),
    "gemma3_text": ArchSpec(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, extra_hparams=_gemma3_hparams),
    "gemma3": ArchSpec(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, extra_hparams=_gemma3_hparams),
}
SUPPORTED_ARCHS: tuple[str, ...] = tuple(ARCHS)
# Multimodal wrappers whose text config is the one written.
_COMPOSITE = {"gemma3"}
_ROPE_TYPES = {None, "default", "linear", "yarn", "llama3"}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def text_config(config):
    """The config of the causal LM itself (Gemma3's text_config for the multimodal wrapper)."""
    if getattr(config, "model_type", None) in _COMPOSITE and getattr(config, "text_config", None) is not None:
        return config.text_config
    return config


def arch_spec(config) -> ArchSpec:
    """The row for `config`, after checking every hyper-parameter the file needs is expressible."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ExportError(f"GGUF export does not support model_type {model_type!r}; "
                          f"supported: {', '.join(SUPPORTED_ARCHS)}")
    spec, cfg = ARCHS[model_type], text_config(config)
    missing = [k for k in _REQUIRED if getattr(cfg, k, None) is None]
    if missing:
        raise ExportError(f"GGUF export: the {model_type} config lacks {', '.join(missing)}")
    full, _ = _rope_params(cfg)
    rope_type = full.get("rope_type", full.get("type"))
    if rope_type not in _ROPE_TYPES or (rope_type == "llama3" and not spec.rope_freqs_tensor):
        raise ExportError(f"GGUF export: rope_type {rope_type!r} of this {model_type} model has no llama.cpp "
                          f"equivalent here; supported: default, linear, yarn (and llama3 for llama/mistral)")
    if getattr(cfg, "attn_logit_softcapping", None) and not spec.attn_softcapping:
        raise ExportError(f"GGUF export: attention logit softcapping is not supported by llama.cpp's {model_type}")
    return spec


def check_gguf_arch(config) -> None:
    """Raise ExportError (listing the supported model types) when `config` cannot be written as GGUF."""
    arch_spec(config)


def gguf_arch_name(config) -> str:
    return gguf.MODEL_ARCH_NAMES[arch_spec(config).gguf_arch]


# ---------------------------------------------------------------------------------------------------
# tensor names

_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", ".inv_freq")
# Multimodal wrappers: the text model's tensors under these prefixes, the rest (vision) not written.
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."), ("model.lm_head.", "lm_head."))
_NON_TEXT_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


@functools.lru_cache(maxsize=16)
def _name_map(arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_blocks)


def _text_name(hf_name: str) -> Optional[str]:
    if hf_name.startswith(_NON_TEXT_PREFIXES):
        return None
    for old, new in _TEXT_PREFIXES:
        if hf_name.startswith(old):
            return new + hf_name[len(old):]
    return hf_name


def gguf_tensor_name(config, hf_name: str) -> Optional[str]:
    """llama.cpp's name for a transformers state-dict entry ("blk.0.attn_q.weight", "token_embd.weight", ...).

    None for tensors a GGUF does not store (rotary inv_freq buffers, a multimodal model's vision tower);
    ExportError naming the tensor for one the architecture does not have.
    """
    spec, cfg = arch_spec(config), text_config(config)
    if hf_name.endswith(_SKIPPED_SUFFIXES):
        return None
    name = _text_name(hf_name)
    if name is None:
        return None
    mapped = _name_map(spec.gguf_arch, cfg.num_hidden_layers).get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ExportError(f"tensor {hf_name!r} has no GGUF name for llama.cpp architecture "
                          f"{gguf.MODEL_ARCH_NAMES[spec.gguf_arch]!r} ({cfg.num_hidden_layers} blocks)")
    return mapped


# ---------------------------------------------------------------------------------------------------
# tensor transforms

def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved rotary order, per head.

    rows: [n_head * head_dim, ...] (weights, packed ggml rows or a bias). Within each head the rows
    [x0 .. x(d/2-1), y0 .. y(d/2-1)] become [x0, y0, x1, y1, ...]; only whole rows move, so a packed
    quantized row is moved intact.
    """
    if rows.shape[0] % (2 * n_head):
        raise ExportError(f"cannot permute {rows.shape[0]} rows into {n_head} rotary heads")
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def qk_heads(cfg, hf_name: str) -> Optional[int]:
    """Heads to permute for a q/k projection tensor (q: attention heads, k: key-value heads), else None."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return cfg.num_attention_heads
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return None


def is_norm(gguf_name: str) -> bool:
    return gguf_name.endswith("norm.weight")


# ---------------------------------------------------------------------------------------------------
# hyper-parameters

def _head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _rope_params(cfg) -> tuple[dict, Optional[dict]]:
    """(full-attention rope parameters, sliding-attention ones or None), transformers 4 or 5 style."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, swa = dict(params.get("full_attention") or {}), params.get("sliding_attention")
    else:
        full, swa = dict(params), None
    if "rope_theta" not in full and getattr(cfg, "rope_theta", None) is not None:
        full["rope_theta"] = cfg.rope_theta
    return full, swa


def write_hparams(writer: gguf.GGUFWriter, config) -> None:
    """Every hyper-parameter llama.cpp's loader reads for this architecture."""
    spec, cfg = arch_spec(config), text_config(config)
    head_dim = _head_dim(cfg)
    writer.add_context_length(int(getattr(cfg, "max_position_embeddings", 0) or 4096))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(getattr(cfg, "rms_norm_eps", 1e-6)))
    writer.add_vocab_size(cfg.vocab_size)
    full, _ = _rope_params(cfg)
    partial = full.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None)) or 1.0
    writer.add_rope_dimension_count(int(head_dim * partial))
    if full.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(full["rope_theta"]))
    _write_rope_scaling(writer, cfg, full)
    if spec.extra_hparams is not None:
        spec.extra_hparams(writer, cfg)


def _write_rope_scaling(writer: gguf.GGUFWriter, cfg, full: dict) -> None:
    rope_type, factor = full.get("rope_type", full.get("type")), full.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        orig = full.get("original_max_position_embeddings", getattr(cfg, "original_max_position_embeddings", None))
        if orig is not None:
            writer.add_rope_scaling_orig_ctx_len(int(orig))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if full.get(key) is not None:
                add(float(full[key]))


def extra_tensors(config) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that the state dict lacks: llama3 rope scaling as `rope_freqs.weight`.

    factor per rotary frequency (head_dim/2 of them): 1 for short wavelengths, `factor` for long ones,
    smoothly interpolated between (the llama3 rope rule).
    """
    spec, cfg = arch_spec(config), text_config(config)
    full, _ = _rope_params(cfg)
    if not spec.rope_freqs_tensor or full.get("rope_type", full.get("type")) != "llama3":
        return
    dim, base = _head_dim(cfg), float(full.get("rope_theta", 10000.0))
    factor = float(full.get("factor", 8.0))
    low, high = float(full.get("low_freq_factor", 1.0)), float(full.get("high_freq_factor", 4.0))
    old_ctx = float(full.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < old_ctx / high, 1.0,
                   np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", out.astype(np.float32)
