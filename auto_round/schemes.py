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

    def __post_init__(self) -> None:
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


def _int_presets() -> dict[str, QuantScheme]:
    table: dict[str, QuantScheme] = {}
    for bits in range(2, 9):
        table[f"W{bits}A16"] = QuantScheme(bits=bits, group_size=128, sym=True)
        table[f"W{bits}A16G64"] = QuantScheme(bits=bits, group_size=64, sym=True)
        table[f"W{bits}A16G32"] = QuantScheme(bits=bits, group_size=32, sym=True)
    table["BF16"] = FP_SCHEME
    table["FP16"] = FP_SCHEME
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
        return FP_SCHEME
    if overrides.get("data_type") in ("fp", "float"):
        return FP_SCHEME
    return base.replace(**overrides)
