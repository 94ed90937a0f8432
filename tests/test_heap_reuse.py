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
from auto_round.model.memory import freed_memory_reused

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

size = 24 << 20
with freed_memory_reused(sys.argv[1] == "on") as reused:
    t = torch.ones(size // 4)  # every page touched
    held = rss()
    del t
    kept = rss()
after = rss()
print(reused, (held - kept) >> 20, (kept - after) >> 20)
"""

needs_glibc = pytest.mark.skipif(_libc("mallopt") is None or not os.path.exists("/proc/self/statm"),
                                 reason="glibc's mallopt and Linux /proc")


def _probe(mode: str) -> tuple[str, int, int]:
    """(took effect, MiB handed back when the tensor is freed, MiB handed back when the context closes)."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    reused, on_free, on_exit = out.stdout.split()
    return reused, int(on_free), int(on_exit)


@needs_glibc
def test_freed_memory_is_kept_while_open_and_handed_back_on_exit():
    reused, on_free, on_exit = _probe("on")
    assert reused == "True"
    assert on_free < 4, f"{on_free} MiB of a freed 24 MiB tensor went back to the OS inside the context"
    assert on_exit >= 20, f"only {on_exit} MiB handed back when the context closed"


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
