"""Resume after kill -9 / Ctrl-C: per-block checkpoints, then --resume gives the same bytes as a clean run.

The interrupted runs are real CLI subprocesses; the test watches the checkpoint's state.json and sends
SIGKILL (or SIGINT) as soon as a block is recorded there, so no hidden test hook is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf

from auto_round.cli.main import main
from auto_round.export.manifest import MANIFEST_NAME, RUN_LOG_FILES
from auto_round.model.checkpoint_resume import checkpoint_dir_for
from tiny_models import VOCAB, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().save_pretrained(base / "model")
    tiny_tokenizer().save_pretrained(base / "model")
    (base / "calib.txt").write_text("\n".join(f"line {i}: " + " ".join(f"w{i * j}" for j in range(40))
                                              for i in range(64)))
    return base


def _args(base, out, iters=40, extra=()):
    return [str(base / "model"), "--dataset", str(base / "calib.txt"), "--nsamples", "8", "--seqlen", "32",
            "--iters", str(iters), "--batch_size", "2", "--group_size", "32", "--device", "cpu", "--disable_amp",
            "--output_dir", str(out), "--log_level", "WARNING", *extra]


def _hashes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name not in RUN_LOG_FILES}  # run log: timings


def _done_blocks(out: Path) -> int:
    try:
        return len(json.loads((checkpoint_dir_for(out) / "state.json").read_text())["done"])
    except (OSError, ValueError, KeyError):
        return 0


def _interrupt(base, out, sig, after_blocks=1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "auto_round", *_args(base, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _done_blocks(out) < after_blocks and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.fixture(scope="module")
def clean(setup):
    out = setup / "clean"
    assert main(_args(setup, out)) == 0
    assert not checkpoint_dir_for(out).exists(), "the checkpoint is removed after a successful save"
    return _hashes(out)


def test_run_report_and_event_log(setup, clean):
    out = setup / "clean"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    blocks = [e for e in events if e["event"] == "block"]
    assert [b["name"] for b in blocks] == [f"model.layers.{i}" for i in range(4)]
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
    for b in blocks:
        assert b["loss_best"] <= b["loss_first"] and b["seconds"] > 0 and b["peak_rss_mb"] > 0
        assert len(b["layer_errors"]) == 7 and all(0 < e < 1 for e in b["layer_errors"].values())
    report = (out / "report.md").read_text()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for name, entry in manifest["files"].items():
        assert f"| {name} | {entry['bytes']} | {entry['sha256']} |" in report
    assert "model.layers.3" in report


def test_plots_decode_to_images_with_axes(setup, clean):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg
    import numpy as np

    for png in ("loss_per_block.png", "layer_error.png"):
        img = mpimg.imread(setup / "clean" / png)
        assert img.shape[0] > 100 and img.shape[1] > 100
        gray = img[..., :3].mean(axis=-1)
        assert gray.std() > 0.01, "not a uniform image"
        dark = gray < 0.3
        # axes: some row and some column are dark over a long run of pixels (the spines)
        assert dark.sum(axis=1).max() > img.shape[1] // 2 and dark.sum(axis=0).max() > img.shape[0] // 2
        assert np.unique(img.reshape(-1, img.shape[-1]), axis=0).shape[0] > 2, "more than one colour"


def test_kill9_then_resume_is_byte_identical(setup, clean):
    out = setup / "killed"
    kill_after = random.SystemRandom().randint(1, 3)  # a random block of the 4 (named in any failure below)
    proc = _interrupt(setup, out, signal.SIGKILL, after_blocks=kill_after)
    assert proc.returncode == -signal.SIGKILL, f"killed after block {kill_after}"
    assert not out.exists(), "no output directory after a kill"
    k = _done_blocks(out)
    assert kill_after <= k < 4, f"killed after block {kill_after}, {k} recorded"
    assert main(_args(setup, out)) == 2, "an existing checkpoint without --resume is refused"
    assert main(_args(setup, out, extra=["--resume"])) == 0
    assert _hashes(out) == clean, f"killed after block {kill_after}"
    assert not checkpoint_dir_for(out).exists()
    blocks = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [b["name"] for b in blocks if b["event"] == "block"] == [f"model.layers.{i}" for i in range(4)]


def test_resume_of_a_bf16_checkpoint_tuned_in_fp32_is_byte_identical(setup, tmp_path):
    """The blocks of bf16 files are converted as the walk reaches them (model/dtype_convert.py), so a resumed
    run restores its done blocks into a partly converted model: the output is still the clean run's."""
    base = tmp_path
    model = tf.AutoModelForCausalLM.from_pretrained(setup / "model", dtype=torch.bfloat16)
    model.save_pretrained(base / "model")
    tiny_tokenizer().save_pretrained(base / "model")
    (base / "calib.txt").write_text((setup / "calib.txt").read_text())
    assert main(_args(base, base / "clean")) == 0
    proc = _interrupt(base, base / "killed", signal.SIGKILL, after_blocks=2)
    assert proc.returncode == -signal.SIGKILL and 2 <= _done_blocks(base / "killed") < 4
    assert main(_args(base, base / "killed", extra=["--resume"])) == 0
    assert _hashes(base / "killed") == _hashes(base / "clean")


def test_resume_with_another_setting_is_refused(setup, capsys):
    out = setup / "changed"
    _interrupt(setup, out, signal.SIGKILL)
    capsys.readouterr()
    assert main(_args(setup, out, iters=41, extra=["--resume"])) == 2
    err = capsys.readouterr().err
    assert "tuning" in err and "iters: 40 -> 41" in err and "--resume" in err
    assert not out.exists()
    # --overwrite discards the stale checkpoint and starts fresh
    assert main(_args(setup, out, iters=2, extra=["--overwrite"])) == 0
    assert not checkpoint_dir_for(out).exists()


def test_ctrl_c_finishes_the_block_exits_130_and_resumes(setup, clean):
    out = setup / "sigint"
    proc = _interrupt(setup, out, signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert "--resume" in err
    assert not out.exists()
    assert _done_blocks(out) >= 2, "the block running at Ctrl-C is finished and saved"
    assert main(_args(setup, out, extra=["--resume"])) == 0
    assert _hashes(out) == clean
