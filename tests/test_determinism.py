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
