"""The run report of quantize_and_save with blocks that tune nothing, and a run that quantizes nothing: the report
is written (a '-' where a block has no loss), the call returns, no resume checkpoint is left behind."""

import json

from auto_round import AutoRound
from auto_round.export.manifest import verify_manifest
from tiny_models import random_ids, tiny_model, tiny_tokenizer


def run(out, fmt: str = "auto_round", **kw):
    ar = AutoRound(tiny_model("llama"), tiny_tokenizer(), dataset=random_ids(8, 16), nsamples=8, seqlen=16, **kw)
    ar.quantize_and_save(out, format=fmt)
    return ar


def test_a_block_kept_in_fp_gets_a_dash_row(tmp_path):
    """fp_layers='layers.1' leaves block 1 with no layer to tune: its block record has no loss (it crashed the
    report after the checkpoint was written, and left the resume directory behind)."""
    out = tmp_path / "out"
    run(out, scheme="W4A16G32", iters=2, fp_layers="layers.1")
    report = (out / "report.md").read_text()
    assert "| model.layers.1 | - | - | - |" in report
    assert "| model.layers.0 | - |" not in report and "| model.layers.0 |" in report
    assert verify_manifest(out) == []
    assert not any(p.name.endswith(".resume") for p in tmp_path.iterdir())


def test_gguf_float_runs_no_block_walk(tmp_path):
    """gguf:bf16 quantizes no layer: with iters > 0 nothing is tuned, so no calibration walk runs, and the file is
    the one iters=0 writes."""
    a = run(tmp_path / "tuned", scheme="gguf:bf16", fmt="gguf:bf16", iters=2)
    assert not [e for e in a.run_events if e.get("event") == "block"]
    run(tmp_path / "rtn", scheme="gguf:bf16", fmt="gguf:bf16", iters=0)
    files = [sorted(p for p in (tmp_path / d).glob("*.gguf")) for d in ("tuned", "rtn")]
    assert len(files[0]) == 1 and files[0][0].read_bytes() == files[1][0].read_bytes()


def test_a_report_failure_does_not_fail_the_run(tmp_path, monkeypatch, caplog):
    import auto_round.export.report as report

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_run_report", broken)  # write_run_reports calls it
    caplog.set_level("WARNING", logger="auto_round")
    out = tmp_path / "out"
    run(out, scheme="W4A16G32", iters=2)
    assert "the run report (report.md, events.jsonl) was not written: disk full" in caplog.text
    assert verify_manifest(out) == [] and json.loads((out / "config.json").read_text())["quantization_config"]
    assert not any(p.name.endswith(".resume") for p in tmp_path.iterdir())
