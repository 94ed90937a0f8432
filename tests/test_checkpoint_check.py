"""Loading untrusted checkpoints: safetensors headers, quantization_config values and tensor shapes are checked
before use, and every bad file gives a CheckpointError naming the problem (never a stray exception).

Independent reference for the header reader: the safetensors library itself (whatever we accept, it opens with
the same names, dtypes and shapes). The fuzz tests (hypothesis, bounded example counts) mutate headers, configs
and tensors of a real tiny export and load them end to end.
"""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from auto_round import AutoRound
from auto_round.eval.lm_eval_runner import load_for_eval
from auto_round.inference.checkpoint_check import (CheckpointError, validate_checkpoint,
                                                   validate_quantization_config)
from auto_round.model.safetensors_header import checkpoint_tensors, read_header
from tiny_models import tiny_model, tiny_tokenizer

LAYER = "model.layers.0.self_attn.q_proj"
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "w4"
    AutoRound(tiny_model("llama"), tiny_tokenizer(), iters=0, group_size=32,
              disable_opt_rtn=True).quantize_and_save(out, format="auto_round")
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def _edit_qconfig(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _raw_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


# ------------------------------------------------------------------------------------------------ headers


def test_header_matches_the_safetensors_library(tmp_path):
    tensors = {"a": torch.zeros(3, 5, dtype=torch.int32), "b": torch.ones(7, dtype=torch.float16),
               "c": torch.zeros(0, 4), "d": torch.zeros(2, 2, dtype=torch.float8_e4m3fn)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = read_header(tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(ours)
        for name in f.keys():
            assert list(f.get_slice(name).get_shape()) == list(ours[name].shape)
            assert f.get_slice(name).get_dtype() == ours[name].dtype


@pytest.mark.parametrize("header,data,message", [
    (None, b"", "too short"),
    (b"{}", b"", None),  # an empty but valid file
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 4, "do not lie within"),
    (b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', b"\0" * 8, "needs 12"),
    (b'{"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8, "unknown dtype"),
    (b'{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', b"\0" * 8, "non-negative"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], '
     b'"data_offsets": [4, 8]}}', b"\0" * 8, "overlaps"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8, "hole"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 8, "cover 4 of the 8"),
    (b'{"__metadata__": {"format": 1}}', b"", "__metadata__"),
    (b'[1, 2]', b"", "start with a JSON object"),
    (b'{"a": ', b"", "not valid UTF-8 JSON"),
    (b'{"a": [1]}', b"", "expected an object"),
])
def test_malformed_headers_are_named(tmp_path, header, data, message):
    path = tmp_path / "model.safetensors"
    if header is None:
        path.write_bytes(b"\x05\0\0")
    else:
        _raw_file(path, header, data)
    if message is None:
        assert read_header(path) == {}
        return
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def test_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the file"):
        read_header(path)


def test_sharded_index_is_checked(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "s2.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    assert sorted(checkpoint_tensors(tmp_path)) == ["a", "b"]
    for weight_map, message in [({"a": "../s1.safetensors"}, "plain file name"), ({"a": "s3.safetensors"}, "missing"),
                                ({"a": "s1.safetensors", "b": "s1.safetensors"}, "not in the shard"), ([], "weight_map")]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=message):
            checkpoint_tensors(tmp_path)
    save_file({"a": torch.zeros(2)}, tmp_path / "s2.safetensors")
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="stored twice"):
        checkpoint_tensors(tmp_path)


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("key,value", [
    ("bits", 9), ("bits", "4"), ("bits", True), ("bits", 4.0), ("group_size", 0), ("group_size", -5),
    ("group_size", "128"), ("sym", "yes"), ("data_type", "int7x"), ("data_type", 3), ("act_bits", 1),
    ("weight_block_size", [128]), ("block_name_to_quantize", 5), ("extra_config", []),
    ("extra_config", {"lm_head": 4}), ("extra_config", {"lm_head": {"bits": 12}}),
    ("extra_config", {"q_proj": {"group_size": -7}}), ("dynamic", {"-:.*": "skip"}), ("quant_method", None),
])
def test_bad_config_values_are_named(key, value):
    config = {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": True, key: value}
    with pytest.raises(CheckpointError, match=f"{key}"):
        validate_quantization_config(config)


def test_other_libraries_configs_are_left_to_them():
    foreign = {"quant_method": "compressed-tensors", "bits": "whatever", "config_groups": {}}
    assert validate_quantization_config(foreign) is None  # compressed-tensors' own loader judges its config
    with pytest.raises(CheckpointError, match="bits='whatever'"):  # the same value in one of ours is refused
        validate_quantization_config({**foreign, "quant_method": "auto-round"})


def test_real_configs_pass(export_dir):
    validate_checkpoint(export_dir)
    fixtures = Path(__file__).parent / "fixtures"
    configs = list(fixtures.rglob("config.json"))
    assert configs, "the reference fixtures hold config.json files"
    for path in configs:
        qconfig = json.loads(path.read_text()).get("quantization_config")
        if qconfig:
            validate_quantization_config(qconfig)


# ------------------------------------------------------------------------------------------------ tensors vs config


@pytest.mark.parametrize("case,message", [
    ("bits3", f"{LAYER}.qweight is \\[8, 64\\]"),
    ("group64", "scales is \\[2, 64\\]"),
    ("drop_scales", f"{LAYER}.scales is missing"),
    ("float_qweight", "expected an integer type"),
    ("truncate", "truncated|do not lie within|cover"),
    ("pickle_only", "pickle"),
    ("no_block", "block_name_to_quantize names"),
])
def test_inconsistent_checkpoints_are_refused(export_dir, tmp_path, case, message):
    folder = _copy(export_dir, tmp_path / case)
    weights = folder / "model.safetensors"
    if case == "bits3":
        _edit_qconfig(folder, bits=3)
    elif case == "group64":
        _edit_qconfig(folder, group_size=64)
    elif case in ("drop_scales", "float_qweight"):
        sd = load_file(weights)
        if case == "drop_scales":
            del sd[f"{LAYER}.scales"]
        else:
            sd[f"{LAYER}.qweight"] = sd[f"{LAYER}.qweight"].float()
        save_file(sd, weights, metadata={"format": "pt"})
    elif case == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "pickle_only":
        torch.save(load_file(weights), folder / "pytorch_model.bin")
        weights.unlink()
    elif case == "no_block":
        _edit_qconfig(folder, block_name_to_quantize="model.blocks")
    with pytest.raises(CheckpointError, match=message):
        load_for_eval(folder)


def test_pickle_checkpoint_loads_when_allowed(export_dir, tmp_path):
    folder = _copy(export_dir, tmp_path / "pickle")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    model, _ = load_for_eval(folder, allow_pickle=True)
    assert model.model.layers[0].self_attn.q_proj.qweight.shape == (8, 64)


def test_plain_from_pretrained_names_the_layer(export_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = _copy(export_dir, tmp_path / "hf")
    _edit_qconfig(folder, group_size=16)
    with pytest.raises(CheckpointError, match=f"{LAYER}.scales is \\[2, 64\\].*needs \\[4, 64\\]"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_cli_eval_exit_code(export_dir, tmp_path):
    folder = _copy(export_dir, tmp_path / "cli")
    _edit_qconfig(folder, bits=3)
    proc = subprocess.run([sys.executable, "-m", "auto_round", "--eval", "--model", str(folder), "--tasks", "ppl"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error:" in proc.stderr and "qweight" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ fuzzing

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 40), 1 << 40), st.floats(allow_nan=False),
                       st.text(max_size=12))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=8)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fz") / "model.safetensors"
    path.write_bytes(blob)
    _, problems = _check_against_library(path)
    assert not problems, problems


@FUZZ
@given(st.dictionaries(st.text(max_size=6), _json, max_size=4), st.binary(max_size=64))
def test_fuzz_headers_against_safetensors(tmp_path_factory, header, data):
    """Whatever header we accept, the safetensors library opens the same way (and nothing else escapes)."""
    path = _raw_file(tmp_path_factory.mktemp("fz") / "model.safetensors", json.dumps(header).encode(), data)
    _, problems = _check_against_library(path)
    assert not problems, problems


_valid_entry = st.builds(lambda dt, shape: {"dtype": dt, "shape": shape},
                         st.sampled_from(["F32", "F16", "I32", "U8", "BF16", "I64", "Q8"]),
                         st.lists(st.integers(-1, 4), max_size=3))


@FUZZ
@given(st.lists(_valid_entry, max_size=4), st.integers(-8, 8), st.integers(0, 3))
def test_fuzz_near_valid_headers(tmp_path_factory, entries, offset_error, extra_bytes):
    """Plausible headers with shapes, offsets and lengths a little off: the hard cases for a header reader."""
    header, position = {}, 0
    for i, entry in enumerate(entries):
        size = 1
        for d in entry["shape"]:
            size *= d
        size *= {"F32": 4, "F16": 2, "I32": 4, "U8": 1, "BF16": 2, "I64": 8}.get(entry["dtype"], 1)
        end = position + size + (offset_error if i == len(entries) - 1 else 0)
        header[f"t{i}"] = {**entry, "data_offsets": [position, end]}
        position = max(end, position)
    path = _raw_file(tmp_path_factory.mktemp("fz") / "model.safetensors", json.dumps(header).encode(),
                     b"\0" * (max(position, 0) + extra_bytes))
    exact = (offset_error == 0 and extra_bytes == 0
             and all(e["dtype"] != "Q8" and min(e["shape"], default=0) >= 0 for e in entries))
    accepted, problems = _check_against_library(path)
    assert not problems, problems
    assert accepted or not exact, "a well-formed header was refused"


def _check_against_library(path: Path) -> tuple[bool, list[str]]:
    """(we accept the file, what is wrong): an accepted file must open in the safetensors library with the
    same tensor names and shapes; a refusal must be a CheckpointError that names the file."""
    try:
        ours = read_header(path)
    except CheckpointError as err:
        return False, ([] if path.name in str(err) else [f"the error does not name the file: {err}"])
    mine = {name: list(t.shape) for name, t in ours.items()}
    with safe_open(path, "pt") as f:
        library = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    return True, ([] if mine == library else [f"we read {mine}, the safetensors library reads {library}"])


_QCONFIG_KEYS = ["bits", "group_size", "sym", "data_type", "packing_format", "block_name_to_quantize", "extra_config",
                 "act_bits", "quant_method", "scale_dtype", "weight_block_size", "backend", "iters"]
_qvalue = st.one_of(_json, st.sampled_from([2, 3, 4, 8, 16, -1, 0, 64, 128, "int", "mx_fp", "nv_fp", "fp",
                                            "auto_round:auto_gptq", "auto_round:gptq", "auto_round:auto_awq",
                                            "auto_round:fake", "auto_round:llm_compressor", "model.layers",
                                            "torch.float32", "bf16", "gptq", "awq",
                                            {"model.layers.0.self_attn.q_proj": {"bits": 8}},
                                            {".*mlp.*": {"bits": 2, "group_size": 16}}, {"lm_head": {"bits": 4}}]))


@settings(parent=FUZZ, max_examples=40)
@given(st.dictionaries(st.sampled_from(_QCONFIG_KEYS), _qvalue, min_size=1, max_size=3))
def test_fuzz_config_end_to_end(export_dir, tmp_path_factory, changes):
    """Mutated quantization_config of a real export, loaded the way users load it: ours or CheckpointError."""
    folder = _copy(export_dir, tmp_path_factory.mktemp("fz") / "m")
    _edit_qconfig(folder, **changes)
    try:
        model, _ = load_for_eval(folder)
    except CheckpointError:
        return
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == model.config.vocab_size


@settings(parent=FUZZ, max_examples=25)
@given(st.sampled_from(["qweight", "qzeros", "scales"]), st.integers(0, 1), st.integers(-3, 3),
       st.sampled_from([None, torch.float16, torch.int32, torch.uint8, torch.float32]))
def test_fuzz_tensor_shapes_end_to_end(export_dir, tmp_path_factory, tensor, dim, delta, dtype):
    """One stored tensor resized or re-typed: a CheckpointError names it (or, if still consistent, it loads)."""
    folder = _copy(export_dir, tmp_path_factory.mktemp("fz") / "m")
    sd = load_file(folder / "model.safetensors")
    key = f"{LAYER}.{tensor}"
    shape = list(sd[key].shape)
    shape[dim] = max(shape[dim] + delta, 0)
    sd[key] = torch.zeros(shape, dtype=dtype or sd[key].dtype)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    changed = delta != 0 and shape != list(load_file(export_dir / "model.safetensors")[key].shape)
    try:
        load_for_eval(folder)
    except CheckpointError as err:
        assert key in str(err)
        return
    assert not changed, f"{key} resized to {shape} loaded without an error"
