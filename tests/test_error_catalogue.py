"""The bad-input catalogue: each wrong input is answered before any heavy work by one `auto-round: error:`
line that names the problem (and the fix), exit code 2, and no output directory (nor a hidden partial one).

Each case is (id, setup, CLI arguments, text the message must contain). `setup(tmp)` builds what the case
needs (a broken dataset, a model folder with a defect, ...) and returns substitutions for the arguments:
"{model}" (a good tiny model unless the setup replaces it), "{out}", "{data}".
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from auto_round.cli.main import main
from tiny_models import tiny_model, tiny_tokenizer

TEXT = " ".join(f"word{i}" for i in range(4000))


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("good_model")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _copy_model(src, tmp, name="model"):
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def model_without_tokenizer(src, tmp):
    dst = _copy_model(src, tmp)
    for f in dst.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            f.unlink()
    return {"model": dst}


def model_with_nan(src, tmp):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    dst = tmp / "model"
    model.save_pretrained(dst)
    tiny_tokenizer().save_pretrained(dst)
    return {"model": dst}


def model_pickle_only(src, tmp):
    dst = tmp / "model"
    model = tiny_model("llama")
    model.config.save_pretrained(dst)
    torch.save(model.state_dict(), dst / "pytorch_model.bin")  # transformers 5 writes safetensors only
    tiny_tokenizer().save_pretrained(dst)
    return {"model": dst}


def encoder_model(src, tmp):
    from transformers import T5Config, T5Model  # encoder-decoder: no causal-LM class exists for it

    dst = tmp / "model"
    T5Model(T5Config(vocab_size=260, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)).save_pretrained(dst)
    tiny_tokenizer().save_pretrained(dst)
    return {"model": dst}


def remote_code_model(src, tmp):
    dst = _copy_model(src, tmp)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = "custom_llm_not_in_transformers"
    config["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "modeling_custom.py").write_text("raise RuntimeError('remote code must not run')\n")
    return {"model": dst}


def no_config(src, tmp):
    dst = tmp / "model"
    dst.mkdir()
    (dst / "weights.bin").write_bytes(b"\0" * 16)
    return {"model": dst}


def data_file(content, name="calib.json"):
    def setup(src, tmp):
        path = tmp / name
        path.write_text(content) if isinstance(content, str) else path.write_bytes(content)
        return {"data": path}
    return setup


def out_is_model(src, tmp):
    dst = _copy_model(src, tmp)
    return {"model": dst, "out": dst}


def out_inside_model(src, tmp):
    dst = _copy_model(src, tmp)
    return {"model": dst, "out": dst / "quantized"}


def out_under_a_file(src, tmp):
    (tmp / "afile").write_text("x")
    return {"out": tmp / "afile" / "out"}


def out_read_only(src, tmp):
    parent = tmp / "ro"
    parent.mkdir()
    os.chmod(parent, 0o555)
    return {"out": parent / "out", "_cleanup_chmod": parent}


def out_not_empty(src, tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    return {"out": out}


RTN = ["--iters", "0", "--disable_opt_rtn"]
TUNE = ["--iters", "2", "--nsamples", "2", "--seqlen", "16", "--batch_size", "2"]

CASES = [
    ("unknown-scheme", None, [*RTN, "--scheme", "W9A16"], "unknown scheme 'W9A16'"),
    ("bits-out-of-range", None, [*RTN, "--bits", "9"], "bits=9 is not supported"),
    ("bits-one", None, [*RTN, "--bits", "1"], "bits=1 is not supported"),
    ("group-size-negative", None, [*RTN, "--group_size", "-5"], "group_size=-5"),
    ("unknown-data-type", None, [*RTN, "--data_type", "fp5"], "unknown data_type 'fp5'"),
    ("nvfp4-wrong-group", None, [*RTN, "--scheme", "NVFP4", "--group_size", "32"], "group_size 16"),
    ("unknown-format", None, [*RTN, "--format", "auto_marlin"], "not yet supported format 'auto_marlin'"),
    ("unknown-gguf-preset", None, [*RTN, "--format", "gguf:q9_k"], "not yet supported format"),
    ("format-cannot-hold-bits", None, [*RTN, "--bits", "5", "--format", "auto_gptq"], "auto_gptq"),
    ("awq-ragged-groups", None, [*RTN, "--asym", "--format", "auto_round:auto_awq", "--group_size", "48"],
     "in_features divisible by group_size"),
    ("format-cannot-hold-mxfp4", None, [*RTN, "--scheme", "MXFP4", "--format", "auto_gptq"], "mx_fp"),
    ("gguf-with-other-format", None, [*RTN, "--format", "gguf:q4_0,auto_round"], "cannot be combined"),
    ("format-listed-twice", None, [*RTN, "--format", "auto_round,auto_round"], "listed twice"),
    ("layer-config-no-layer", None, [*RTN, "--layer_config", '{"no_such_layer": {"bits": 8}}'],
     "matches no quantizable layer"),
    ("layer-config-bad-key", None, [*RTN, "--layer_config", '{"q_proj": {"bitz": 8}}'], "bitz"),
    ("layer-config-bad-json", None, [*RTN, "--layer_config", "{q_proj: 8"], "not valid JSON"),
    ("fp-layers-no-layer", None, [*RTN, "--fp_layers", "no_such_layer"], "matches no quantizable layer"),
    ("iters-negative", None, ["--iters", "-1"], "iters must be an integer >= 0"),
    ("nsamples-zero", None, [*TUNE, "--nsamples", "0"], "nsamples must be an integer >= 1"),
    ("seqlen-zero", None, [*TUNE, "--seqlen", "0"], "seqlen must be an integer >= 1"),
    ("batch-larger-than-nsamples", None, [*TUNE, "--batch_size", "4"], "batch_size=4 is larger than nsamples=2"),
    ("model-dtype-unknown", None, [*RTN, "--model_dtype", "fp64"], "unknown dtype 'fp64'"),
    ("device-not-available", None, [*RTN, "--device", "cuda:7"], "cuda:7"),
    ("model-missing", lambda s, t: {"model": t / "nope"}, RTN, "does not exist"),
    ("model-no-config", no_config, RTN, "has no config.json"),
    ("model-not-a-decoder", encoder_model, RTN, "not a causal language model"),
    ("model-pickle-only", model_pickle_only, RTN, "pickle"),
    ("model-needs-remote-code", remote_code_model, [*RTN, "--disable_trust_remote_code"], "trust_remote_code"),
    ("model-nan-weights", model_with_nan, RTN, "model.layers.1.mlp.down_proj.weight"),
    ("tokenizer-missing", model_without_tokenizer, TUNE, "tokenizer"),
    ("dataset-missing", lambda s, t: {"data": t / "missing.json"}, [*TUNE, "--dataset", "{data}"], "missing.json"),
    ("dataset-empty-list", data_file("[]"), [*TUNE, "--dataset", "{data}"], "calib.json"),
    ("dataset-empty-strings", data_file('["", "  "]'), [*TUNE, "--dataset", "{data}"], "calib.json"),
    ("dataset-bad-json", data_file('["unterminated'), [*TUNE, "--dataset", "{data}"], "calib.json"),
    ("dataset-wrong-shape", data_file('{"text": 5}'), [*TUNE, "--dataset", "{data}"], "calib.json"),
    ("dataset-too-short", data_file('["one two three"]'), [*TUNE, "--dataset", "{data}"], "fewer than seqlen"),
    ("dataset-binary", data_file(b"\xff\xfe\x00\x01" * 64, "calib.txt"), [*TUNE, "--dataset", "{data}"], "calib.txt"),
    ("dataset-unknown-option", lambda s, t: {"data": t / "a.json:nmu=3"}, [*TUNE, "--dataset", "{data}"], "nmu"),
    ("out-is-model-dir", out_is_model, [*RTN, "--overwrite"], "source model directory"),
    ("out-inside-model-dir", out_inside_model, RTN, "source model directory"),
    ("out-under-a-file", out_under_a_file, RTN, "afile"),
    ("out-read-only", out_read_only, RTN, "not writable"),
    ("out-not-empty", out_not_empty, RTN, "not empty"),
]


def test_catalogue_has_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,setup,args,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, capsys, good_model, case_id, setup, args, needle):
    subs = {"model": good_model, "out": tmp_path / "out", "data": tmp_path / "data.json"}
    subs.update(setup(good_model, tmp_path) if setup else {})
    if case_id == "out-read-only" and os.geteuid() == 0:
        pytest.skip("root can write into read-only directories")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["--model", str(subs["model"]), "--output_dir", str(subs["out"])]
    for a in args:
        for key in ("model", "out", "data"):
            a = a.replace("{" + key + "}", str(subs[key]))
        argv.append(a)
    try:
        code = main(argv)
    finally:
        if "_cleanup_chmod" in subs:
            os.chmod(subs["_cleanup_chmod"], 0o755)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("auto-round: error:")]
    assert code == 2, err
    assert len(errors) == 1 and needle in errors[0], err
    assert not any("Traceback" in line for line in err)
    after = sorted(p.name for p in tmp_path.iterdir())
    if case_id not in ("out-not-empty", "out-is-model-dir", "out-inside-model-dir"):
        assert not subs["out"].exists() or not any(subs["out"].iterdir()), "no output directory may be written"
    assert after == before, f"files appeared: {sorted(set(after) - set(before))}"
    if case_id == "out-not-empty":
        assert (subs["out"] / "precious.txt").read_text() == "user data"
    if case_id in ("out-is-model-dir", "out-inside-model-dir"):
        assert sorted(p.name for p in subs["model"].iterdir()) == sorted(p.name for p in good_model.iterdir())
