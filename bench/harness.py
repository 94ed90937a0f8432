"""Run one quantization command under `/usr/bin/time -v` and read what it did from its log.

Shared by `bench/compare.py`. Knows the log lines of both implementations:
    per block:   "... loss iter 0: X -> iter j: Y"          (same text in ours and the reference's)
    tuning time: ours "quantization done in S s", the reference "quantization tuning time S"
and `/usr/bin/time -v`'s "Maximum resident set size (kbytes)".
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS_BIN = ROOT / ".venv" / "bin"
PEER_BIN = ROOT / ".venv-peer" / "bin"

BLOCK_LOSS = re.compile(r"(?:(\S+): )?quantized \S+ layers in the block, loss iter 0: ([0-9.eE+-]+) -> iter (\d+): "
                        r"([0-9.eE+-]+)")
TUNING_TIME = [re.compile(r"quantization done in ([0-9.]+) s"),
               re.compile(r"quantization tuning time[: ]+([0-9.]+)")]
PEAK_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


@dataclass
class RunRecord:
    """What one quantization run cost and produced."""

    impl: str
    command: list[str]
    returncode: int
    wall_s: float
    tuning_s: float | None
    peak_rss_mib: float | None
    block_losses: list[dict] = field(default_factory=list)
    output_dir: str | None = None
    output_mib: float | None = None
    log_file: str | None = None


def offline_env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def parse_block_losses(log: str) -> list[dict]:
    rows = []
    for i, match in enumerate(BLOCK_LOSS.finditer(log)):
        name = match.group(1)
        if not name or re.fullmatch(r"L\d+", name):  # the reference's line names no block, only its source line
            name = f"block {i}"
        rows.append({"block": name, "loss_first": float(match.group(2)), "best_iter": int(match.group(3)),
                     "loss_best": float(match.group(4))})
    return rows


def reference_loss_to_mse(rows: list[dict], batch_size: int, seqlen: int) -> list[dict]:
    """The reference logs each block's loss divided once more by the number of unmasked tokens in the batch
    (its `total_loss += loss.item() / num_elm`, with num_elm = batch_size * (seqlen - 1): the last position
    is masked). Ours logs the plain masked MSE. Multiplying puts both on the same scale."""
    tokens = batch_size * (seqlen - 1)
    return [{**r, "loss_first": r["loss_first"] * tokens, "loss_best": r["loss_best"] * tokens,
             "loss_scale": f"x{tokens} (reference log / unmasked tokens)"} for r in rows]


def parse_tuning_time(log: str) -> float | None:
    for pattern in TUNING_TIME:
        found = pattern.findall(log)
        if found:
            return float(found[-1])
    return None


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**20


def find_checkpoint(output_dir: Path) -> Path | None:
    """The folder holding config.json: `output_dir` itself (ours) or its one sub-folder (the reference)."""
    if (output_dir / "config.json").is_file():
        return output_dir
    subs = [p for p in output_dir.glob("*/config.json")]
    return subs[0].parent if len(subs) == 1 else None


def run_quantization(impl: str, command: list[str], output_dir: Path, log_file: Path, cwd: Path,
                     threads: int | None = None) -> RunRecord:
    """Run `command` (a CLI invocation) under `/usr/bin/time -v`, log to `log_file`, parse the log."""
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, env=offline_env(threads), stdout=log,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    record = record_from_log(impl, log_file, output_dir, returncode=proc.returncode)
    return replace(record, command=command, wall_s=wall)


def record_from_log(impl: str, log_file: Path, output_dir: Path, returncode: int | None = None) -> RunRecord:
    """Build a `RunRecord` from a finished run's log (`/usr/bin/time -v` gives wall time and exit status)."""
    text = log_file.read_text(errors="replace")
    rss = PEAK_RSS.search(text)
    elapsed = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)", text)
    if returncode is None:
        status = re.search(r"Exit status: (\d+)", text)
        returncode = int(status.group(1)) if status else -1
    wall = 0.0
    for part in (elapsed.group(1).split(":") if elapsed else []):
        wall = wall * 60 + float(part)
    command = re.search(r'Command being timed: "(.*)"', text)
    ckpt = find_checkpoint(output_dir) if returncode == 0 and output_dir.exists() else None
    return RunRecord(
        impl=impl, command=command.group(1).split() if command else [], returncode=returncode,
        wall_s=wall, tuning_s=parse_tuning_time(text), peak_rss_mib=int(rss.group(1)) / 1024 if rss else None,
        block_losses=parse_block_losses(text), output_dir=str(ckpt) if ckpt else None,
        output_mib=dir_mib(ckpt) if ckpt else None, log_file=str(log_file),
    )


def run_json(python: Path, script: Path, args: list[str], cwd: Path, threads: int | None = None) -> str:
    """Run a helper script with another interpreter and return its last stdout line (a JSON object)."""
    proc = subprocess.run([str(python), str(script), *args], cwd=cwd, env=offline_env(threads),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]
