"""freed_memory_reused (model/memory.py): while open, memory a tuning step frees stays in the process for the next
step instead of going back to the OS; on exit it is handed back. Checked on the resident set of a fresh process
(a process that has already freed big blocks has a grown dynamic mmap threshold and would keep them anyway)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from auto_round.model.memory import _libc

PROBE = r"""
import os, sys, torch
from auto_round.model.memory import freed_memory_reused, large_blocks_reused

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

size = int(sys.argv[2]) << 20
with freed_memory_reused(sys.argv[1] != "off") as reused, large_blocks_reused(sys.argv[1] == "large") as large:
    t = torch.ones(size // 4)  # every page touched
    held = rss()
    del t
    kept = rss()
after = rss()
print(reused and (large or sys.argv[1] != "large"), (held - kept) >> 20, (kept - after) >> 20)
"""

needs_glibc = pytest.mark.skipif(_libc("mallopt") is None or not os.path.exists("/proc/self/statm"),
                                 reason="glibc's mallopt and Linux /proc")


def _probe(mode: str, mib: int = 24) -> tuple[str, int, int]:
    """(took effect, MiB handed back when a tensor of `mib` MiB is freed, MiB handed back when the context
    closes)."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(mib)], capture_output=True, text=True, check=True)
    reused, on_free, on_exit = out.stdout.split()
    return reused, int(on_free), int(on_exit)


@needs_glibc
def test_freed_memory_is_kept_while_open_and_handed_back_on_exit():
    reused, on_free, on_exit = _probe("on")
    assert reused == "True"
    assert on_free < 4, f"{on_free} MiB of a freed 24 MiB tensor went back to the OS inside the context"
    assert on_exit >= 20, f"only {on_exit} MiB handed back when the context closed"


@needs_glibc
def test_blocks_above_the_largest_mmap_threshold_are_kept_only_with_large_blocks_reused():
    # glibc cannot be told to heap-allocate above 32 MiB through the threshold; bigger models' activations are
    # bigger than that (Llama-3-8B, 8 x 2048 tokens: 940 MiB for down_proj's input)
    reused, on_free, on_exit = _probe("large", 48)
    assert reused == "True"
    assert on_free < 4, f"{on_free} MiB of a freed 48 MiB tensor went back to the OS inside the context"
    assert on_exit >= 44, f"only {on_exit} MiB handed back when the context closed"
    _, on_free, _ = _probe("on", 48)
    assert on_free >= 44, "without large_blocks_reused a freed 48 MiB block goes back at once (glibc's mmap)"


@needs_glibc
def test_disabled_leaves_malloc_as_it_was():
    reused, on_free, _ = _probe("off")
    assert reused == "False"
    assert on_free >= 20, "glibc's default unmaps a freed 24 MiB block at once; the probe no longer shows it"


def test_cli_flag_turns_it_off(monkeypatch, tmp_path):
    import auto_round.cli.main as cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_autoround(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr("auto_round.compressor.AutoRound", fake_autoround)
    model = tmp_path / "model"
    model.mkdir()
    for flag, expected in (([], True), (["--disable_reuse_freed_memory"], False)):
        with pytest.raises(Stop):
            cli.main(["--model", str(model), "--iters", "0", "--output_dir", str(tmp_path / "out"), *flag])
        assert seen["reuse_freed_memory"] is expected
