"""The data-type presets against the reference's table (reference-autoround.md §3.7) and their validation."""

import pytest

from auto_round.schemes import PRESET_SCHEMES, QuantScheme, SchemeError, get_scheme, normalize_data_type, resolve_scheme

# name: (bits, group_size, data_type, act_bits, act_data_type, act_group_size, act_dynamic), from §3.7
REFERENCE_TABLE = {
    "MXFP4": (4, 32, "mx_fp", 4, "mx_fp", 32, True),
    "MXFP4_RCEIL": (4, 32, "mx_fp", 4, "mx_fp_rceil", 32, True),
    "MXFP6": (6, 32, "mx_fp", 6, "mx_fp", 32, True),
    "MXFP8": (8, 32, "mx_fp", 8, "mx_fp", 32, True),
    "MXFP8_RCEIL": (8, 32, "mx_fp", 8, "mx_fp_rceil", 32, True),
    "MXINT4": (4, 32, "mx_int", 4, "mx_int", 32, True),
    "NVFP4": (4, 16, "nv_fp", 4, "nv_fp4_with_static_gs", 16, True),
    "FPW8A16": (8, 0, "fp", 16, "fp", 0, True),
    "FP8_STATIC": (8, -1, "fp", 8, "fp", 0, False),
    "FP8_BLOCK": (8, (128, 128), "fp", 8, "fp", 128, True),
    "INT8": (8, -1, "int", 8, "int", -1, True),
    "INT8_W8A8": (8, -1, "int", 8, "int", -1, True),
    "INT4": (4, -1, "int", 4, "int", -1, True),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_TABLE))
def test_presets_match_the_reference_table(name):
    s = get_scheme(name.lower())  # names are case-insensitive
    bits, group, dtype, act_bits, act_dtype, act_group, dynamic = REFERENCE_TABLE[name]
    assert (s.bits, s.group_size, s.data_type, s.act_bits) == (bits, group, dtype, act_bits)
    assert s.is_quantized and s.is_int == (dtype == "int")
    if act_bits < 16:
        assert s.quantizes_activations
        assert (s.resolved_act_data_type, s.resolved_act_group_size, s.act_dynamic) == (act_dtype, act_group, dynamic)
    else:
        assert not s.quantizes_activations


def test_unknown_scheme_lists_the_valid_names():
    with pytest.raises(SchemeError) as err:
        get_scheme("MXFP5")
    for name in ("MXFP4", "NVFP4", "FP8_STATIC", "INT8", "W4A16"):
        assert name in str(err.value)


def test_data_type_aliases_imply_bits():
    assert normalize_data_type("mx_fp4") == ("mx_fp", 4)
    assert normalize_data_type("NVFP4") == ("nv_fp", 4)
    assert normalize_data_type("float") == ("fp", None)
    s = resolve_scheme("W4A16", data_type="fp8", group_size=-1)
    assert (s.data_type, s.bits, s.group_size) == ("fp", 8, -1)
    with pytest.raises(SchemeError, match="unknown data_type"):
        resolve_scheme("W4A16", data_type="fp5")


@pytest.mark.parametrize("fields, needle", [
    (dict(data_type="nv_fp", bits=4, group_size=32), "group_size 16"),
    (dict(data_type="mx_fp", bits=4, group_size=64), "group_size 32"),
    (dict(data_type="mx_fp", bits=5, group_size=32), "bits=5"),
    (dict(data_type="fp", bits=4), "bits=4"),
    (dict(data_type="int", bits=4, group_size=(128, 128)), "only defined for FP8"),
    (dict(data_type="fp", bits=8, group_size=(128, 0)), "two positive ints"),
    (dict(bits=4, act_bits=8, act_data_type="nv_fp"), "act_bits=8"),
    (dict(bits=4, group_size=32, data_type="mx_fp", act_bits=4, act_group_size=16), "act_group_size 32"),
    (dict(bits=4, act_bits=8, act_data_type="mx_fp_rceil", act_group_size=32, act_dynamic=False), "static"),
    (dict(bits=4, act_bits=8, act_data_type="fp4"), "act_data_type"),
])
def test_invalid_combinations_are_named(fields, needle):
    with pytest.raises(SchemeError, match=needle):
        QuantScheme(**fields)


def test_every_preset_is_a_valid_frozen_scheme():
    for name, scheme in PRESET_SCHEMES.items():
        assert hash(scheme) is not None, name
        assert QuantScheme(**scheme.to_dict()) == scheme
