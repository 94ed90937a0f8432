"""Activation fields given next to a preset (`act_bits`, `act_data_type`, `act_group_size`, `act_sym`, `act_dynamic`;
CLI --act_bits, --act_dtype, --act_group_size, --act_asym, --disable_act_dynamic) override the preset's, as the
reference's AutoRound and CLI do, and reach the exported quantization_config. The reference's other spellings of
the tuning switches (--enable_minmax_tuning, --no-enable_quanted_input, ...) parse too."""

import json

import pytest

from auto_round import AutoRound, AutoScheme
from auto_round.algorithms.autoscheme import AutoSchemeError
from auto_round.cli.main import main
from auto_round.schemes import get_scheme
from tiny_models import random_ids, saved_tiny_model, tiny_model, word_text_file


def input_activations(out) -> dict:
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 1
    return next(iter(groups.values()))["input_activations"]


def test_api_fields_override_the_preset(tmp_path):
    ar = AutoRound(tiny_model("llama"), scheme="FP8_STATIC", act_dynamic=True, iters=0, dataset=random_ids(4, 16))
    assert ar.scheme == get_scheme("FP8_STATIC").replace(act_dynamic=True)
    ar.quantize_and_save(tmp_path / "ct", format="llm_compressor")
    act = input_activations(tmp_path / "ct")
    assert (act["dynamic"], act["strategy"], act["type"]) == (True, "tensor", "float")
    ar = AutoRound(tiny_model("llama"), scheme="W4A16G32", act_bits=8, act_data_type="int", act_group_size=-1,
                   act_sym=False, iters=0, dataset=random_ids(4, 16))
    s = ar.scheme
    assert (s.bits, s.group_size, s.act_bits, s.act_data_type, s.act_group_size, s.act_sym) == (4, 32, 8, "int", -1, False)


def test_api_fields_cannot_join_an_autoscheme():
    with pytest.raises(AutoSchemeError, match="act_group_size cannot be combined with scheme=AutoScheme"):
        AutoRound(tiny_model("llama"), scheme=AutoScheme(3.0, "W2A16G64,W4A16G64"), act_group_size=-1,
                  dataset=random_ids(4, 16))


def test_cli_flags_reach_the_export(tmp_path):
    model = saved_tiny_model(tmp_path / "m")
    text = word_text_file(tmp_path / "calib.txt")
    common = ["--iters", "0", "--nsamples", "4", "--seqlen", "32", "--dataset", str(text), "--format", "llm_compressor",
              "--disable_progress"]
    out = tmp_path / "w4a8"
    assert main([str(model), "--scheme", "W4A16G32", "--act_bits", "8", "--act_dtype", "int", "--act_group_size", "-1",
                 "--act_asym", "--output_dir", str(out), *common]) == 0
    act = input_activations(out)
    assert (act["num_bits"], act["type"], act["strategy"], act["symmetric"], act["dynamic"]) == (8, "int", "token", False,
                                                                                                  True)
    out = tmp_path / "int8-static"
    assert main([str(model), "--scheme", "INT8", "--disable_act_dynamic", "--act_group_size", "0", "--output_dir", str(out),
                 *common]) == 0
    act = input_activations(out)
    assert (act["strategy"], act["dynamic"]) == ("tensor", False)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.input_scale" in f.keys()


@pytest.mark.parametrize("argv,minmax_off,quanted_off", [
    ([], False, False), (["--enable_minmax_tuning", "--enable_quanted_input"], False, False),
    (["--disable_minmax_tuning", "--disable_quanted_input"], True, True),
    (["--no-enable_minmax_tuning", "--no-enable_quanted_input"], True, True),  # the reference's other spellings
])
def test_reference_spellings_of_the_tuning_switches(argv, minmax_off, quanted_off):
    from auto_round.cli.main import build_parser

    args = build_parser().parse_args(["model", *argv])
    assert (args.disable_minmax_tuning, args.disable_quanted_input) == (minmax_off, quanted_off)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["model", "--enable_minmax_tuning", "--disable_minmax_tuning"])
