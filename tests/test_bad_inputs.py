"""Bad inputs give one clear error (CLI: one line on stderr, exit code 2) and leave no output behind."""

import json

import pytest

import torch

from auto_round import AutoRound
from auto_round.cli.main import main
from tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in lines if "error" in line.lower()]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--scheme", "W9A16"], "unknown scheme 'W9A16'"),
        (["--bits", "9"], "bits=9 is not supported"),
        (["--group_size", "-5"], "group_size=-5"),
        (["--asym", "--format", "auto_round:auto_awq", "--group_size", "48"], "in_features divisible by group_size"),
        (["--format", "gguf:q9_k"], "not yet supported format"),
        (["--layer_config", '{"no_such_layer": {"bits": 8}}'], "matches no quantizable layer"),
        (["--iters", "-1"], "iters must be an integer >= 0"),
    ],
)
def test_bad_settings(tmp_path, capsys, model_dir, extra, needle):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "--model", str(model_dir), "--iters", "0", "--output_dir", str(out), *extra)
    assert code == 2
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()
    assert not list(tmp_path.glob(".out*")), "no partial directory may be left behind"


def test_missing_model_path(tmp_path, capsys):
    code, err = run_cli(capsys, "--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["[]", '[""]'])
def test_empty_dataset(tmp_path, capsys, model_dir, content):
    data = tmp_path / "calib.json"
    data.write_text(content)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "--model", str(model_dir), "--iters", "2", "--nsamples", "2", "--seqlen", "8",
                        "--dataset", str(data), "--output_dir", str(out))
    assert code == 2 and len(err) == 1 and "calib.json" in err[0], err
    assert not out.exists()


def test_existing_output_dir_is_not_clobbered(tmp_path, capsys, model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    code, err = run_cli(capsys, "--model", str(model_dir), "--iters", "0", "--output_dir", str(out))
    assert code == 2 and "not empty" in err[0]
    assert (out / "precious.txt").read_text() == "user data"


def test_rtn_cli_writes_a_complete_checkpoint(tmp_path, capsys, model_dir):
    out = tmp_path / "out"
    code = main(["--model", str(model_dir), "--iters", "0", "--group_size", "32", "--output_dir", str(out)])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["iters"] == 0
    assert (out / "model.safetensors").exists() and (out / "quantization_config.json").exists()


def test_quantize_again_after_a_failure_is_refused(tmp_path, model_dir, monkeypatch):
    """A quantize() that stopped half-way (an error, Ctrl-C) leaves earlier blocks quantized in place; a second
    call on the same object would quantize them twice and write a wrong model without a word. It is refused,
    before any output check (overwrite=True must not delete the checkpoint a new object can resume from)."""
    import hashlib

    import auto_round.compressor_walk as walk
    from auto_round import AutoRound
    from auto_round.model.checkpoint_resume import checkpoint_dir_for

    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([f"text {i}: " + " ".join(f"w{i * j}" for j in range(20)) for i in range(8)]))
    kw = dict(dataset=str(calib), nsamples=4, seqlen=16, iters=3, batch_size=2, group_size=32, device="cpu",
              amp=False, disable_progress=True, run_report=False)

    def hashes(out):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.safetensors"))}

    AutoRound(str(model_dir), **kw).quantize_and_save(tmp_path / "clean")
    tune, calls = walk.tune_block, []

    def fails_on_the_second_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("simulated out of memory")
        return tune(*args, **kwargs)

    monkeypatch.setattr(walk, "tune_block", fails_on_the_second_block)
    plain = AutoRound(str(model_dir), **kw)
    with pytest.raises(MemoryError):
        plain.quantize()
    with pytest.raises(RuntimeError, match=r"finished: model.layers.0\).*quantize those weights twice"):
        plain.quantize()
    with pytest.raises(RuntimeError, match="quantize those weights twice"):
        plain.save_quantized(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()

    out = tmp_path / "out"
    calls.clear()
    saving = AutoRound(str(model_dir), **kw)
    with pytest.raises(MemoryError):
        saving.quantize_and_save(out)
    assert checkpoint_dir_for(out).is_dir()
    with pytest.raises(RuntimeError, match="resume=True"):
        saving.quantize_and_save(out, overwrite=True)
    assert checkpoint_dir_for(out).is_dir(), "the refused retry must leave the checkpoint to resume from"
    AutoRound(str(model_dir), resume=True, **kw).quantize_and_save(out)  # a new object continues correctly
    assert hashes(out) == hashes(tmp_path / "clean")


def test_a_model_object_quantized_in_place_is_refused_by_another_autoround():
    """quantize() changes the weights of a model passed as an nn.Module in place; handing that object to a
    second AutoRound would quantize already quantized weights (and take them for the fp targets)."""
    from auto_round import AutoRound
    from tiny_models import random_ids

    model = tiny_model("llama")
    fresh = tiny_model("llama")
    AutoRound(model, iters=0, group_size=32, disable_opt_rtn=True).quantize()
    with pytest.raises(ValueError, match="already quantized in place by another AutoRound"):
        AutoRound(model, iters=0, group_size=32)
    AutoRound(fresh, dataset=random_ids(2, 16), nsamples=2, seqlen=16, iters=1, group_size=32)  # a fresh one is fine


def test_fused_moe_experts_left_unquantized_are_warned(caplog):
    """transformers >= 5 stores MoE experts as 3-D parameters, not Linear layers: they were silently left in fp
    (89 % of this Mixtral's block weights). Now named in a warning with their share; a dense model warns nothing."""
    import logging

    import transformers as tf

    from auto_round.model.setup import warn_unquantized_block_weights

    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_local_experts=4,
                              num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with caplog.at_level(logging.WARNING, logger="auto_round"):
        ar = AutoRound(model, tiny_tokenizer(), scheme="W4A16G32", iters=0)
    assert "experts.gate_up_proj [4, 256, 64]" in caplog.text and "fused MoE experts" in caplog.text
    share = warn_unquantized_block_weights(ar.model, ar.block_groups, list(ar.layer_schemes))
    assert share > 0.85
    dense = AutoRound(tiny_model("llama"), tiny_tokenizer(), scheme="W4A16G32", iters=0)
    assert warn_unquantized_block_weights(dense.model, dense.block_groups, list(dense.layer_schemes)) == 0.0
