"""Same seed and inputs on CPU -> byte-identical output directories; the manifest lists every file's hash.

SignRound (iters > 0) runs the full tuning loop here, RTN the data-free path; the directory is compared
file by file (names and bytes), and the manifest's SHA-256 values are checked against the files.
"""

import hashlib
import json

import pytest

from auto_round import AutoRound
from auto_round.export.manifest import MANIFEST_NAME, RUN_LOG_FILES, verify_manifest
from tiny_models import random_ids, tiny_model


def _quantize(out, seed, fmt="auto_round", **kw):
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), nsamples=8, seqlen=16, group_size=32, seed=seed,
                   **{"iters": 4, "batch_size": 4, **kw})
    ar.quantize_and_save(out, format=fmt)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).as_posix() not in RUN_LOG_FILES}  # the run log holds timings


@pytest.mark.parametrize("fmt,kw", [("auto_round", {}), ("auto_round", {"iters": 0, "disable_opt_rtn": True}),
                                    ("llm_compressor", {}), ("gguf:q4_0", {"iters": 0, "scheme": "gguf:q4_0"})])
def test_same_seed_gives_identical_bytes(tmp_path, fmt, kw):
    first = _quantize(tmp_path / "a", 7, fmt, **kw)
    second = _quantize(tmp_path / "b", 7, fmt, **kw)
    assert MANIFEST_NAME in first
    assert sorted(first) == sorted(second)
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []


def test_a_different_seed_changes_the_tuned_weights(tmp_path):
    # 2 bits, batch 2, 20 steps: enough tuning that the seed's batch order shows in the weights
    a = _quantize(tmp_path / "a", 7, bits=2, iters=20, batch_size=2)
    b = _quantize(tmp_path / "b", 8, bits=2, iters=20, batch_size=2)
    weights = [n for n in a if n.endswith(".safetensors")]
    assert weights and any(a[n] != b[n] for n in weights)


def test_manifest_hashes_and_run_record(tmp_path):
    files = _quantize(tmp_path / "out", 7)
    manifest = json.loads(files[MANIFEST_NAME])
    assert set(manifest["files"]) == set(files) - {MANIFEST_NAME}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256(files[name]).hexdigest()
        assert entry["bytes"] == len(files[name])
    run = manifest["run"]
    assert run["seed"] == 7 and run["tuning"]["iters"] == 4
    ids = random_ids(8, 16).long()
    expected = hashlib.sha256(ids.numpy().tobytes() + (ids * 0 + 1).numpy().tobytes()).hexdigest()
    assert run["calibration"]["sha256"] == expected
    assert set(run["block_losses"]) == {"model.layers.0", "model.layers.1"}
    assert {"torch", "transformers"} <= set(manifest["versions"])
    assert verify_manifest(tmp_path / "out") == []
    (tmp_path / "out" / "config.json").write_text("{}")
    assert verify_manifest(tmp_path / "out") == ["config.json: contents differ from the manifest"]


def test_deterministic_algorithms_are_on_while_quantizing_then_restored(tmp_path, monkeypatch):
    import torch

    import auto_round.compressor as compressor
    from auto_round.cli.main import build_parser

    seen = []
    walk = compressor.quantize_signround
    monkeypatch.setattr(compressor, "quantize_signround",
                        lambda ar: seen.append(torch.are_deterministic_algorithms_enabled()) or walk(ar))
    plain = _quantize(tmp_path / "a", 7)
    strict = _quantize(tmp_path / "b", 7, enable_deterministic_algorithms=True)
    assert seen == [False, True]
    assert not torch.are_deterministic_algorithms_enabled()  # restored
    assert strict == plain  # on CPU the tuning was deterministic already
    assert build_parser().parse_args(["m", "--enable_deterministic_algorithms"]).enable_deterministic_algorithms
    assert not build_parser().parse_args(["m"]).enable_deterministic_algorithms


@pytest.mark.parametrize("scheme", ["MXFP4", "NVFP4", "FP8_STATIC", "gguf:q4_k_s"])
def test_every_type_tunes_under_deterministic_algorithms(tmp_path, scheme):
    # no op of the tuning lacks a deterministic implementation (it would raise here)
    ar = AutoRound(tiny_model("llama"), scheme=scheme, dataset=random_ids(8, 16), nsamples=8, seqlen=16, iters=2,
                   batch_size=4, enable_deterministic_algorithms=True)
    _, results = ar.quantize()
    assert results
