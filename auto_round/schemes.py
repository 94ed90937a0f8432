"""Quantization schemes: one frozen dataclass and the preset table.

A scheme says how one layer's weight (and, later, activations) is quantized. Everything else in the
package takes a `QuantScheme`, never loose keyword arguments, so a layer's recipe is one value that can
be compared, hashed and written to a config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

# Weight data types and the bit widths each supports. "fp" with 8 bits is FP8 e4m3; 16 bits (any type)
# leaves a layer in floating point. mx_*: OCP microscaling (E8M0 scale per 32), nv_fp: NVFP4 (E4M3 scale
# per 16 and a per-tensor fp32 global scale).
WEIGHT_BITS: Mapping[str, tuple[int, ...]] = {
    "int": (2, 3, 4, 5, 6, 7, 8), "fp": (8,), "mx_fp": (4, 6, 8), "mx_int": (4, 8), "nv_fp": (4,),
}
SUPPORTED_DATA_TYPES = tuple(WEIGHT_BITS)
SUPPORTED_WEIGHT_BITS = WEIGHT_BITS["int"]
# Group sizes the microscaling types are defined for (OCP MX: 32; NVFP4: 16)
FIXED_GROUP_SIZE: Mapping[str, int] = {"mx_fp": 32, "mx_int": 32, "nv_fp": 16}
# Activation data types: name -> bit widths. mx_fp_rceil: MX with the ceil exponent rule (NVIDIA);
# nv_fp4_with_static_gs: NVFP4 with dynamic per-16 scales and a calibrated (static) global scale.
ACT_BITS: Mapping[str, tuple[int, ...]] = {
    "int": (4, 8), "fp": (8,), "mx_fp": (4, 6, 8), "mx_fp_rceil": (4, 6, 8), "mx_int": (4, 8),
    "nv_fp": (4,), "nv_fp4_with_static_gs": (4,),
}
# Spellings users (and the reference's configs) write -> (data_type, bits implied or None)
DATA_TYPE_ALIASES: Mapping[str, tuple[str, Optional[int]]] = {
    "float": ("fp", None), "fp8": ("fp", 8), "fp8_e4m3": ("fp", 8), "fp8_e4m3fn": ("fp", 8), "fp8_sym": ("fp", 8),
    "mx_fp4": ("mx_fp", 4), "mxfp4": ("mx_fp", 4), "mx_fp6": ("mx_fp", 6), "mxfp6": ("mx_fp", 6),
    "mx_fp8": ("mx_fp", 8), "mxfp8": ("mx_fp", 8), "mx_int4": ("mx_int", 4), "mxint4": ("mx_int", 4),
    "mx_int8": ("mx_int", 8), "nv_fp4": ("nv_fp", 4), "nvfp4": ("nv_fp", 4),
}


def normalize_data_type(name: str) -> tuple[str, Optional[int]]:
    """'mx_fp4' -> ('mx_fp', 4), 'float' -> ('fp', None), 'int' -> ('int', None); SchemeError if unknown."""
    key = str(name).strip().lower()
    if key in WEIGHT_BITS:
        return key, None
    if key in DATA_TYPE_ALIASES:
        return DATA_TYPE_ALIASES[key]
    known = ", ".join([*WEIGHT_BITS, *DATA_TYPE_ALIASES])
    raise SchemeError(f"unknown data_type {name!r}; known: {known}")


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
        0 = one scale for the whole tensor, (m, n) = m x n blocks (FP8 only). A ragged last group is
        zero-padded. mx_* types need 32, nv_fp needs 16.
    sym: for int, full-range symmetric (signed scale, grid [-2^(b-1), 2^(b-1)-1]) when True, else
        asymmetric with an integer zero point. The float types are symmetric by construction.
    data_type: "int" (integer grid), "fp" (FP8 e4m3 at 8 bits; unquantized at 16), "mx_fp" (MXFP4 /
        MXFP6 e2m3 / MXFP8 e4m3), "mx_int" (MXINT4 / MXINT8), "nv_fp" (NVFP4).
    act_bits: activation bits (>= 16: activations stay in floating point).
    act_data_type / act_group_size / act_sym: the activations' type, group (-1 per token, 0 per
        tensor) and symmetry; None = the weight's data_type / group_size / sym.
    act_dynamic: scales computed from each input at run time (True) or calibrated once (False, static).
    """

    bits: int = 4
    group_size: "int | tuple[int, int]" = 128
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
        if isinstance(self.group_size, list):  # from JSON
            object.__setattr__(self, "group_size", tuple(self.group_size))
        if self.gguf is not None:
            self._check_gguf()
        if self.data_type not in SUPPORTED_DATA_TYPES:
            raise SchemeError(f"data_type {self.data_type!r} is not supported; choose one of {SUPPORTED_DATA_TYPES}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise SchemeError(f"bits={self.bits!r} must be an integer")
        if self.is_quantized and self.bits not in WEIGHT_BITS[self.data_type]:
            raise SchemeError(
                f"bits={self.bits} is not supported for data_type {self.data_type!r}: weight bits must be one of "
                f"{WEIGHT_BITS[self.data_type]} (or 16 to keep a layer in floating point)"
            )
        self._check_group_size()
        if self.act_bits < 16:
            self._check_act()

    def _check_group_size(self) -> None:
        g = self.group_size
        if isinstance(g, tuple):
            if not (len(g) == 2 and all(isinstance(x, int) and x > 0 for x in g)):
                raise SchemeError(f"a block group_size must be two positive ints (rows, cols), got {g!r}")
            if self.is_quantized and self.data_type != "fp":
                raise SchemeError(f"block group_size {g} is only defined for FP8 weights (data_type 'fp', bits 8)")
            return
        if isinstance(g, bool) or not isinstance(g, int) or g < -1:
            raise SchemeError(f"group_size={g!r} must be a positive int, -1 (per channel) or 0 (per tensor)")
        fixed = FIXED_GROUP_SIZE.get(self.data_type)
        if self.is_quantized and fixed is not None and g != fixed:
            raise SchemeError(f"data_type {self.data_type!r} is defined for group_size {fixed}, got {g}")

    def _check_act(self) -> None:
        dtype = self.resolved_act_data_type
        if dtype not in ACT_BITS:
            raise SchemeError(f"act_data_type {dtype!r} is not supported; choose one of {tuple(ACT_BITS)}")
        if self.act_bits not in ACT_BITS[dtype]:
            raise SchemeError(f"act_bits={self.act_bits} is not supported for act_data_type {dtype!r}: one of "
                              f"{ACT_BITS[dtype]}, or 16 for no activation quantization")
        group = self.resolved_act_group_size
        if isinstance(group, bool) or not isinstance(group, int) or group < -1:
            raise SchemeError(f"act_group_size={group!r} must be a positive int, -1 (per token) or 0 (per tensor)")
        fixed = 16 if dtype.startswith("nv_fp") else 32 if dtype.startswith("mx_") else None
        if fixed is not None and group != fixed:
            raise SchemeError(f"act_data_type {dtype!r} is defined for act_group_size {fixed}, got {group}")
        if not self.act_dynamic and dtype not in ("int", "fp", "nv_fp4_with_static_gs"):
            raise SchemeError(f"static activation quantization (act_dynamic=False) is defined for int and fp8 "
                              f"activations, not {dtype!r}")
        if self.gguf is not None:
            raise SchemeError("GGUF schemes quantize weights only; act_bits must be 16")

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
        """True when the weight is quantized (bits < 16), whatever its data type."""
        return self.bits < 16

    @property
    def is_int(self) -> bool:
        """True for integer-grid weights (the GPTQ / AWQ / pack-quantized families)."""
        return self.is_quantized and self.data_type == "int"

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits < 16

    @property
    def resolved_act_data_type(self) -> str:
        return self.act_data_type if self.act_data_type is not None else self.data_type

    @property
    def resolved_act_group_size(self) -> int:
        if self.act_group_size is not None:
            return self.act_group_size
        return self.group_size[1] if isinstance(self.group_size, tuple) else self.group_size

    @property
    def resolved_act_sym(self) -> bool:
        return self.sym if self.act_sym is None else self.act_sym

    def replace(self, **changes: Any) -> "QuantScheme":
        """A copy with some fields changed; None values are ignored (meaning 'keep').

        A data_type alias that implies a width ('mx_fp4', 'fp8') sets bits too, unless bits is given."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise SchemeError(f"unknown scheme field(s): {sorted(unknown)}")
        if "data_type" in changes:
            dtype, implied_bits = normalize_data_type(changes["data_type"])
            changes["data_type"] = dtype
            if implied_bits is not None:
                changes.setdefault("bits", implied_bits)
        if "act_data_type" in changes and changes["act_data_type"] in DATA_TYPE_ALIASES:
            changes["act_data_type"] = DATA_TYPE_ALIASES[changes["act_data_type"]][0]
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
    table.update(_float_presets())
    for mix, base in GGUF_MIXES.items():  # the mix's base type; per-tensor promotions: model/gguf_mix.py
        table[f"GGUF:{mix.upper()}"] = gguf_scheme(base)
    return table


def _float_presets() -> dict[str, QuantScheme]:
    """The reference's data-type presets (its schemes.py table): weights and activations."""
    mx = lambda dtype, bits, act=None: QuantScheme(  # noqa: E731
        bits=bits, group_size=32, data_type=dtype, act_bits=bits, act_data_type=act or dtype, act_group_size=32)
    return {
        "MXFP4": mx("mx_fp", 4), "MXFP4_RCEIL": mx("mx_fp", 4, "mx_fp_rceil"),
        "MXFP6": mx("mx_fp", 6), "MXFP8": mx("mx_fp", 8), "MXFP8_RCEIL": mx("mx_fp", 8, "mx_fp_rceil"),
        "MXINT4": mx("mx_int", 4),
        "NVFP4": QuantScheme(bits=4, group_size=16, data_type="nv_fp", act_bits=4,
                             act_data_type="nv_fp4_with_static_gs", act_group_size=16),
        "FPW8A16": QuantScheme(bits=8, group_size=0, data_type="fp"),
        "FP8_STATIC": QuantScheme(bits=8, group_size=-1, data_type="fp", act_bits=8, act_data_type="fp",
                                  act_group_size=0, act_dynamic=False),
        "FP8_BLOCK": QuantScheme(bits=8, group_size=(128, 128), data_type="fp", act_bits=8, act_data_type="fp",
                                 act_group_size=128),
        "INT8": QuantScheme(bits=8, group_size=-1, sym=True, act_bits=8, act_data_type="int", act_group_size=-1),
        "INT8_W8A8": QuantScheme(bits=8, group_size=-1, sym=True, act_bits=8, act_data_type="int", act_group_size=-1),
        "INT4": QuantScheme(bits=4, group_size=-1, sym=True, act_bits=4, act_data_type="int", act_group_size=-1),
    }


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
    act_data_type: Optional[str] = None,
    act_group_size: Optional[int] = None,
    act_sym: Optional[bool] = None,
    act_dynamic: Optional[bool] = None,
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
    return base.replace(bits=bits, group_size=group_size, sym=sym, data_type=data_type, act_bits=act_bits,
                        act_data_type=act_data_type, act_group_size=act_group_size, act_sym=act_sym,
                        act_dynamic=act_dynamic)


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
    if overrides.get("data_type") in ("fp", "float") and int(overrides.get("bits") or base.bits) != 8:
        return FP_SCHEME if base.gguf is None else gguf_scheme("f16")  # "fp" without 8 bits: not FP8, plain float
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
