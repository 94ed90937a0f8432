"""`AutoScheme`: what a user asks of the mixed-precision search (reference API, `scheme=AutoScheme(...)`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ...schemes import GGML_FLOAT_TYPES, GGUF_MIXES, QuantScheme, SchemeError, gguf_mix_of, resolve_scheme

logger = logging.getLogger("auto_round")

SCORES = ("fisher", "delta_loss")


class AutoSchemeError(SchemeError):
    """AutoScheme settings that cannot be honoured (unknown option, empty options, target out of range)."""


def _option_label(option: Any) -> str:
    if isinstance(option, str):
        return option.strip().upper()
    return repr(option)


def scheme_label(s: QuantScheme) -> str:
    """A short name for a scheme given as a QuantScheme/dict: 'int2_g64', 'mx_fp4_g32_a4', 'int4_g128_asym'."""
    label = f"{s.data_type}{s.bits}_g{s.group_size}" + ("" if s.sym or not s.is_int else "_asym")
    return label + (f"_a{s.act_bits}" if s.quantizes_activations else "") if s.is_quantized else "fp16"


def parse_options(options: "str | Sequence[str | QuantScheme | dict]"
                  ) -> tuple[tuple[str, ...], tuple[QuantScheme, ...], tuple[Optional[str], ...]]:
    """Comma string or list of presets / QuantScheme / dicts -> (labels, schemes, GGUF mixes), duplicates removed.

    Two options that resolve to the same QuantScheme (e.g. W4A16 given twice, a preset and its dict, or
    gguf:q4_k_s and gguf:q4_k_m, whose base type is the same q4_k) are one option; the first spelling is
    kept. The mix of a GGUF option is its llama.cpp preset ('q2_k_s'; for a QuantScheme with a ggml type,
    the first preset of that base type), None for the others. GGUF and other options cannot be mixed: one
    file format must hold every layer."""
    items = [o for o in options.split(",")] if isinstance(options, str) else list(options or [])
    items = [o for o in items if not (isinstance(o, str) and not o.strip())]
    if not items:
        raise AutoSchemeError("AutoScheme needs at least one option, e.g. options='W2A16G64,W4A16G64'")
    labels: list[str] = []
    schemes: list[QuantScheme] = []
    mixes: list[Optional[str]] = []
    for option in items:
        try:
            scheme = resolve_scheme(option.strip() if isinstance(option, str) else option)
        except SchemeError as err:
            raise AutoSchemeError(f"AutoScheme option {_option_label(option)!r} is not a valid scheme: {err}") from err
        if scheme in schemes:
            continue
        labels.append(_option_label(option) if isinstance(option, str) else scheme_label(scheme))
        schemes.append(scheme)
        mixes.append(_gguf_mix(option, scheme))
    if len({m is None for m in mixes}) > 1:
        raise AutoSchemeError(f"AutoScheme options {', '.join(labels)} mix GGUF types with other schemes; a GGUF file "
                              "holds only ggml types and the other formats none: choose all gguf:* or none")
    return tuple(labels), tuple(schemes), tuple(mixes)


def _gguf_mix(option: Any, scheme: QuantScheme) -> Optional[str]:
    """The llama.cpp preset of a GGUF option (None for the others); float presets are refused."""
    if scheme.gguf is None:
        return None
    if scheme.gguf in GGML_FLOAT_TYPES:
        raise AutoSchemeError(f"AutoScheme option {_option_label(option)!r} keeps the weights in {scheme.gguf}; "
                              "GGUF options must be quantized ggml types (gguf:q2_k_s ... gguf:q8_0)")
    mix = gguf_mix_of(option.strip()) if isinstance(option, str) else None
    return mix or next(m for m, base in GGUF_MIXES.items() if base == scheme.gguf)


def _parse_targets(avg_bits: Any) -> tuple[float, ...]:
    if isinstance(avg_bits, str):
        avg_bits = [a for a in avg_bits.split(",") if a.strip()]
    values = list(avg_bits) if isinstance(avg_bits, (list, tuple)) else [avg_bits]
    if not values:
        raise AutoSchemeError("avg_bits is empty; give a target such as avg_bits=3.0")
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise AutoSchemeError(f"avg_bits must be a number or a list of numbers, got {v!r}") from None
        if isinstance(v, bool) or not math.isfinite(f) or f <= 0:
            raise AutoSchemeError(f"avg_bits must be a positive finite number, got {v!r}")
        out.append(f)
    return tuple(out)


@dataclass(frozen=True)
class AutoScheme:
    """Mixed precision: choose one of `options` per layer so the average bits stay <= `avg_bits`.

    avg_bits: target average bits per weight element (float), or a list of targets: one plan per target;
        AutoRound quantizes with the plan of the FIRST target and saves every plan (autoscheme_plan.json).
    options: preset names (comma string or list), QuantScheme or dicts; duplicates are dropped.
    shared_layers: extra groups that must share one option, per block: each entry is a pattern or a list
        of patterns (regex, re.search on the layer name); the layers of one block matched by one entry
        form one group. All experts of a block are always grouped.
    share_fused_layers: True (the default for int / float options): q/k/v and gate/up of one parent take one
        option, because vLLM and other runtimes that concatenate them into one weight cannot load fused
        members of different bits. False lets each take its own (a better plan at the same bits;
        transformers and our loader read it, fused-kernel runtimes do not); a warning says so. None (the
        default) = True, except for GGUF options: llama.cpp keeps q/k/v and gate/up as separate tensors of
        any types (its own q*_k_m mixes give attn_v more bits than attn_q), so they are not grouped.
    GGUF options (gguf:q2_k_s, gguf:q4_k_m, ...): each layer gets the option's base ggml type, after
        llama.cpp's row-length fallback; the file's mix (embedding and output types, file type) is the
        format's, or the first option's when the format does not name one.
    ignore_scale_zp_bits: count only b bits per weight (not the per-group scales and zero points).
    nsamples / seqlen / batch_size / dataset: the calibration data of the scoring (reference defaults 16
        samples of 256 tokens, also for None; batch_size None = 8, at most nsamples (the Fisher score backpropagates one
        sample at a time whatever it is: it needs per-sample gradients); dataset None = AutoRound's).
    method, device_map, enable_torch_compile, low_gpu_mem_usage, low_cpu_mem_usage: the reference's arguments,
        accepted so its code runs unchanged. method must be "default"; the scoring always runs block by block with
        the block inputs in host memory (the reference's low_gpu_mem_usage=True) on AutoRound's device, eagerly, so
        low_gpu_mem_usage=False, device_map and enable_torch_compile only get a warning; low_cpu_mem_usage has no
        effect on it.
    score: the layer sensitivity. "fisher" (the default): 1/2 sum F * (W - W_hat)^2 with F the per-sample
        squared gradient of the LM loss at the fp weights (diagonal empirical Fisher), plus the same form for
        quantized activations; one forward/backward for all options. "delta_loss" (the reference's):
        sum |dL/dW_hat * (W - W_hat)| with the gradient of the model that has every candidate layer quantized
        by the option at once, one forward/backward per option. On SmolLM2 the Fisher plans had lower (or equal)
        perplexity in every setting measured (int, GGUF, MX mixes; README) at about half the scoring time.
    """

    avg_bits: Any
    options: Any
    shared_layers: Optional[Sequence[Any]] = None
    ignore_scale_zp_bits: bool = False
    share_fused_layers: Optional[bool] = None
    batch_size: Optional[int] = None
    nsamples: Optional[int] = 16
    seqlen: Optional[int] = 256
    dataset: Any = None
    score: str = "fisher"
    # the reference's signature: accepted so its code runs unchanged (see the class docstring)
    method: str = "default"
    device_map: Any = None
    enable_torch_compile: Optional[bool] = None
    low_gpu_mem_usage: bool = True
    low_cpu_mem_usage: bool = True

    def __post_init__(self) -> None:
        self._check_reference_arguments()
        object.__setattr__(self, "targets", _parse_targets(self.avg_bits))
        for key, default in (("nsamples", 16), ("seqlen", 256)):  # None: the default (the reference's spelling)
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)
        labels, schemes, mixes = parse_options(self.options)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "schemes", schemes)
        object.__setattr__(self, "mixes", mixes)
        for key in ("nsamples", "seqlen") + (("batch_size",) if self.batch_size is not None else ()):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AutoSchemeError(f"AutoScheme {key} must be a positive integer, got {value!r}")
        if self.score not in SCORES:
            raise AutoSchemeError(f"AutoScheme score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.shared_layers is not None:
            object.__setattr__(self, "shared_layers", normalize_shared_layers(self.shared_layers))
        if self.share_fused_layers is None:
            object.__setattr__(self, "share_fused_layers", not self.is_gguf)
        if not isinstance(self.share_fused_layers, bool):
            raise AutoSchemeError(f"AutoScheme share_fused_layers must be True, False or None, got "
                                  f"{self.share_fused_layers!r}")

    def _check_reference_arguments(self) -> None:
        if self.method != "default":
            raise AutoSchemeError(f"AutoScheme method must be 'default' (the reference's only one; choose the layer "
                                  f"sensitivity with score={SCORES}), got {self.method!r}")
        if not self.low_gpu_mem_usage:
            logger.warning("AutoScheme low_gpu_mem_usage=False: the scoring here always runs block by block with the "
                           "block inputs in host memory (the reference's low_gpu_mem_usage=True)")
        if self.device_map is not None or self.enable_torch_compile:
            logger.warning("AutoScheme device_map / enable_torch_compile are not used: the scoring runs eagerly on "
                           "AutoRound's device")

    @property
    def is_gguf(self) -> bool:
        """The options are ggml types: the plan is written as one GGUF file."""
        return self.mixes[0] is not None

    @property
    def resolved_batch_size(self) -> int:
        return min(8, self.nsamples) if self.batch_size is None else self.batch_size


def normalize_shared_layers(shared: Any) -> tuple[tuple[str, ...], ...]:
    """'q_proj,k_proj' | ['mlp', ['q_proj', 'k_proj']] -> (('q_proj', 'k_proj'),) | (('mlp',), ('q_proj', 'k_proj'))."""
    entries = [shared] if isinstance(shared, str) else list(shared)
    out = []
    for entry in entries:
        patterns = entry.split(",") if isinstance(entry, str) else list(entry)
        patterns = tuple(str(p).strip() for p in patterns if str(p).strip())
        if not patterns:
            raise AutoSchemeError(f"shared_layers entry {entry!r} holds no pattern")
        out.append(patterns)
    return tuple(out)
