"""The run report written into a finished output directory, next to (not in) the manifest.

    events.jsonl         run start (settings), one record per tuned block (losses, best_iter, seconds,
                         peak_rss_mb, tokens/s, per-layer relative weight error), run end
    report.md            settings, timing, per-block loss table, per-layer error table, file hashes
    loss_per_block.png, layer_error.png    with the optional extra `pip install auto-round[report]` (matplotlib)

These hold timings, so they differ between identical runs: they are RUN_LOG_FILES, left out of the
manifest and of the byte-identity of the artifact (export/manifest.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .manifest import MANIFEST_NAME

logger = logging.getLogger("auto_round")


def _blocks(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("event") == "block"]


def _num(value, spec: str = ".6g") -> str:
    """A table cell: '-' for a block that tuned nothing (all its layers in fp: no loss, no best iteration)."""
    return "-" if value is None else format(value, spec)


def _series(blocks: list[dict], key: str) -> list[float]:
    return [float("nan") if b.get(key) is None else b[key] for b in blocks]


def _plots(directory: Path, blocks: list[dict]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("report: matplotlib is not installed, no PNG plots (pip install auto-round[report])")
        return []
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    x = range(len(blocks))
    ax.plot(x, _series(blocks, "loss_first"), "o-", label="iter 0")
    ax.plot(x, _series(blocks, "loss_best"), "o-", label="best")
    ax.set_xlabel("block")
    ax.set_ylabel("loss (MSE)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "loss_per_block.png")
    plt.close(fig)
    errs = [(n, e) for b in blocks for n, e in b.get("layer_errors", {}).items()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.bar(range(len(errs)), [e for _, e in errs])
    ax.set_xlabel("layer (in block order)")
    ax.set_ylabel("relative weight error")
    fig.tight_layout()
    fig.savefig(directory / "layer_error.png")
    plt.close(fig)
    return ["loss_per_block.png", "layer_error.png"]


def write_run_report(directory: "str | Path", events: list[dict]) -> None:
    directory = Path(directory)
    (directory / "events.jsonl").write_text("".join(json.dumps(e, sort_keys=True, default=str) + "\n" for e in events))
    blocks = _blocks(events)
    manifest_path = directory / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    start = next((e for e in events if e.get("event") == "run_start"), {})
    end = next((e for e in reversed(events) if e.get("event") == "run_end"), {})
    lines = ["# Quantization run report", "", "## Settings", "", "```json",
             json.dumps(start.get("settings", manifest.get("run", {})), indent=1, sort_keys=True, default=str), "```", ""]
    if start and end:
        lines += [f"Wall time: {end['time'] - start['time']:.1f} s (tuning: "
                  f"{sum(b['seconds'] for b in blocks):.1f} s), peak RSS {end.get('peak_rss_mb')} MB", ""]
    if blocks:
        lines += ["## Per-block loss", "", "| block | loss iter 0 | best loss | best iter | seconds | peak RSS MB | tokens/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {b['name']} | {_num(b['loss_first'])} | {_num(b['loss_best'])} | {_num(b['best_iter'], 'd')} | "
                  f"{b['seconds']} | {b['peak_rss_mb']} | {b['tokens_per_s']} |" for b in blocks]
        lines += ["", "## Per-layer relative weight error ||W_q - W|| / ||W||", "", "| layer | error |", "|---|---|"]
        lines += [f"| {n} | {e:.4g} |" for b in blocks for n, e in b.get("layer_errors", {}).items()]
        lines.append("")
    pngs = _plots(directory, blocks) if blocks else []
    lines += [f"![{p}]({p})" for p in pngs] + ([""] if pngs else [])
    lines += ["## Files (from quantization_manifest.json)", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {n} | {f['bytes']} | {f['sha256']} |" for n, f in sorted(manifest.get("files", {}).items())]
    (directory / "report.md").write_text("\n".join(lines) + "\n")


def write_run_reports(directories: list, events: list[dict]) -> None:
    """write_run_report into each finished output directory. A failure only warns: the checkpoint is complete and
    covered by its manifest, and the report is a by-product."""
    for directory in directories:
        try:
            write_run_report(directory, events)
        except Exception as err:  # noqa: BLE001
            logger.warning("%s: the run report (report.md, events.jsonl) was not written: %s", directory, err)
