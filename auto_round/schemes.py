"""Quantization schemes: one frozen dataclass and the preset table.

A scheme says how one layer's weight (and, later, activations) is quantized. Everything else in the
package takes a `QuantScheme`, never loose keyword arguments, so a layer's recipe is one value that can
be compared, hashed and written to a config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

SUPPORTED_DATA_TYPES = ("int", "fp")
SUPPORTED_WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)

# ggml block types a layer can be quantized to: name -> (bits, elements per scale, sym). Facts from
# llama.cpp's block layouts; the math lives in quant/gguf.
GGML_WEIGHT_TYPES: Mapping[str, tuple[int, int, bool]] = {
    "q4_0": (4, 32, True), "q4_1": (4, 32, False), "q5_0": (5, 32, True), "q5_1": (5, 32, False),
    "q8_0": (8, 32, True), "q2_k": (2, 16, False), "q3_k": (3, 16, True), "q4_k": (4, 32, False),
    "q5_k": (5, 32, False), "q6_k": (6, 16, True),
}
GGML_FLOAT_TYPES = ("bf16", "f16", "f32")
# gguf:<mix> presets (llama.cpp file types) -> the base ggml type of the mix
GGUF_MIXES: Mapping[str, str] = {
    "q2_k_s": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k", "q4_k_s": "q4_k",
    "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k", "q4_0": "q4_0", "q4_1": "q4_1",
    "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0", "bf16": "bf16", "f16": "f16", "f32": "f32",
}


class SchemeError(ValueError):
    """A scheme name or field value that cannot be honoured."""


@dataclass(frozen=True)
class QuantScheme:
    """How one Linear layer is quantized.

    bits: weight bit width; 16 or more means the layer stays in floating point.
    group_size: elements along in_features that share one scale; -1 = per output channel,
        0 = one scale for the whole tensor. A ragged last group is zero-padded.
    sym: full-range symmetric (signed scale, grid [-2^(b-1), 2^(b-1)-1]) when True, else asymmetric
        with an integer zero point.
    data_type: "int" for integer grids, "fp" for layers left in floating point.
    act_*: activation quantization (act_bits >= 16 means none); carried for the config and future
        schemes, not used by the integer weight-only path.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    data_type: str = "int"
    act_bits: int = 16
    act_group_size: Optional[int] = None
    act_sym: Optional[bool] = None
    act_data_type: Optional[str] = None
    act_dynamic: bool = True
    # ggml block type ("q4_k", ...) for GGUF export, or a float type ("bf16", "f16", "f32") for a layer
    # kept in floating point in a GGUF file; None for every other scheme
    gguf: Optional[str] = None

    def __post_init__(self) -> None:
        if self.gguf is not None:
            self._check_gguf()
        if self.data_type not in SUPPORTED_DATA_TYPES:
            raise SchemeError(
                f"data_type {self.data_type!r} is not supported yet; choose one of {SUPPORTED_DATA_TYPES}"
            )
        if self.is_quantized and self.bits not in SUPPORTED_WEIGHT_BITS:
            raise SchemeError(
                f"bits={self.bits} is not supported: weight bits must be one of {SUPPORTED_WEIGHT_BITS} "
                "(or 16 to keep a layer in floating point)"
            )
        if not isinstance(self.group_size, int) or self.group_size < -1:
            raise SchemeError(f"group_size={self.group_size!r} must be a positive int, -1 (per channel) or 0 (per tensor)")
        if self.act_bits < 16:
            raise SchemeError(
                f"act_bits={self.act_bits}: activation quantization is not implemented yet; use act_bits=16"
            )

    def _check_gguf(self) -> None:
        if self.gguf in GGML_FLOAT_TYPES:
            if self.is_quantized:
                raise SchemeError(f"gguf={self.gguf!r} is a float type; it needs bits=16, data_type='fp'")
            return
        if self.gguf not in GGML_WEIGHT_TYPES:
            known = ", ".join([*GGML_WEIGHT_TYPES, *GGML_FLOAT_TYPES])
            raise SchemeError(f"unknown ggml type gguf={self.gguf!r}; known: {known}")
        bits, sub, sym = GGML_WEIGHT_TYPES[self.gguf]
        if (self.bits, self.group_size, self.sym, self.data_type) != (bits, sub, sym, "int"):
            raise SchemeError(
                f"gguf={self.gguf!r} fixes bits={bits}, group_size={sub}, sym={sym}; got bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, data_type={self.data_type!r}"
            )

    @property
    def is_quantized(self) -> bool:
        """True when the weight is put on an integer grid (bits < 16)."""
        return self.data_type == "int" and self.bits < 16

    def replace(self, **changes: Any) -> "QuantScheme":
        """A copy with some fields changed; None values are ignored (meaning 'keep')."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise SchemeError(f"unknown scheme field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FP_SCHEME = QuantScheme(bits=16, data_type="fp")


def gguf_scheme(ggml_type: str) -> QuantScheme:
    """The scheme of a layer stored as `ggml_type` in a GGUF file ("q4_k", ..., or "bf16"/"f16"/"f32")."""
    if ggml_type in GGML_FLOAT_TYPES:
        return QuantScheme(bits=16, data_type="fp", gguf=ggml_type)
    if ggml_type not in GGML_WEIGHT_TYPES:
        raise SchemeError(f"unknown ggml type {ggml_type!r}; known: {', '.join([*GGML_WEIGHT_TYPES, *GGML_FLOAT_TYPES])}")
    bits, sub, sym = GGML_WEIGHT_TYPES[ggml_type]
    return QuantScheme(bits=bits, group_size=sub, sym=sym, gguf=ggml_type)


def gguf_mix_of(name: "str | None") -> Optional[str]:
    """'gguf:q4_k_m' / 'GGUF:Q4_K_M' -> 'q4_k_m'; None for a name that is not a gguf preset."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    if not key.startswith("gguf:"):
        return None
    mix = key[len("gguf:"):]
    if mix not in GGUF_MIXES:
        raise SchemeError(f"unknown GGUF preset {name!r}; known: {', '.join('gguf:' + m for m in GGUF_MIXES)}")
    return mix


def _int_presets() -> dict[str, QuantScheme]:
    table: dict[str, QuantScheme] = {}
    for bits in range(2, 9):
        table[f"W{bits}A16"] = QuantScheme(bits=bits, group_size=128, sym=True)
        table[f"W{bits}A16G64"] = QuantScheme(bits=bits, group_size=64, sym=True)
        table[f"W{bits}A16G32"] = QuantScheme(bits=bits, group_size=32, sym=True)
    table["BF16"] = FP_SCHEME
    table["FP16"] = FP_SCHEME
    for mix, base in GGUF_MIXES.items():  # the mix's base type; per-tensor promotions: model/gguf_mix.py
        table[f"GGUF:{mix.upper()}"] = gguf_scheme(base)
    return table


PRESET_SCHEMES: Mapping[str, QuantScheme] = _int_presets()


def preset_names() -> list[str]:
    return sorted(PRESET_SCHEMES)


def get_scheme(name: str) -> QuantScheme:
    """The preset called `name` (case-insensitive), or a SchemeError listing the valid names."""
    key = name.strip().upper()
    if key not in PRESET_SCHEMES:
        raise SchemeError(f"unknown scheme {name!r}; known schemes: {', '.join(preset_names())}")
    return PRESET_SCHEMES[key]


def resolve_scheme(
    scheme: "str | QuantScheme | Mapping[str, Any] | None" = "W4A16",
    *,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    sym: Optional[bool] = None,
    data_type: Optional[str] = None,
    act_bits: Optional[int] = None,
) -> QuantScheme:
    """Turn a preset name / scheme / dict into a QuantScheme, then apply explicit field overrides.

    Explicit `bits`, `group_size`, `sym`... win over the preset (as in the reference).
    """
    if scheme is None:
        base = PRESET_SCHEMES["W4A16"]
    elif isinstance(scheme, QuantScheme):
        base = scheme
    elif isinstance(scheme, str):
        base = get_scheme(scheme)
    elif isinstance(scheme, Mapping):
        base = QuantScheme().replace(**dict(scheme))
    else:
        raise SchemeError(f"scheme must be a preset name, a QuantScheme or a dict, not {type(scheme).__name__}")
    return base.replace(bits=bits, group_size=group_size, sym=sym, data_type=data_type, act_bits=act_bits)


def scheme_for_bits(base: QuantScheme, overrides: Mapping[str, Any]) -> QuantScheme:
    """Apply a per-layer override dict (e.g. from layer_config) to a base scheme.

    bits >= 16 turns the layer into floating point regardless of the other fields.
    """
    overrides = dict(overrides)
    if "scheme" in overrides:
        base = resolve_scheme(overrides.pop("scheme"))
    bits = overrides.get("bits")
    if bits is not None and int(bits) >= 16:
        return FP_SCHEME if base.gguf is None else gguf_scheme("f16")
    if overrides.get("data_type") in ("fp", "float"):
        return FP_SCHEME if base.gguf is None else gguf_scheme("f16")
    if base.gguf is not None and overrides.get("gguf") is None and overrides.get("bits") is not None:
        # a bit width in a GGUF model means the ggml type of that width (nearest, as the reference)
        return gguf_scheme(nearest_ggml_type(int(overrides["bits"]), base.gguf))
    if overrides.get("gguf") is not None:
        return gguf_scheme(str(overrides["gguf"]).lower())
    return base.replace(**overrides)


def nearest_ggml_type(bits: int, like: str) -> str:
    """The ggml type with `bits` bits, of the same family (k-quant or legacy) as `like` where one exists."""
    kquant = like.endswith("_k")
    same_bits = [t for t, (b, _, _) in GGML_WEIGHT_TYPES.items() if b == bits]
    if not same_bits:
        raise SchemeError(f"no ggml type has {bits} bits; widths available: "
                          f"{sorted({b for b, _, _ in GGML_WEIGHT_TYPES.values()})}")
    preferred = [t for t in same_bits if t.endswith("_k") == kquant]
    return (preferred or same_bits)[0]
