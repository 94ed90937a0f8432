"""The reference's `auto-round` CLI with its `--disable_amp` flag made to work; run with the reference venv's
python (`.venv-peer/bin/python bench/peer_cli.py <the CLI's arguments>`), never imported by the project.

Why: auto-round 0.16.1 parses `--disable_amp` (`cli/parser.py`) but never passes it on, so its compressor keeps
its default `amp=True`. On a CPU with bf16 support (this AVX-512-BF16 box) that casts the whole model to bf16
and tunes in bf16, whatever the flag says; on a CPU without bf16 it falls back to fp32 by itself, which is why
the flag looked honoured on the AVX2 boxes earlier benches ran on. Measured 2026-12-07 (4-layer SmolLM2, MXFP4,
two threads): every tuning matmul got bf16 inputs with `--disable_amp`. The reference's Python API takes
`amp=False` and then tunes in fp32; this wrapper passes that keyword when the flag is given, so bench settings
named `*_fp32` are fp32 on both sides on every CPU.
"""

from __future__ import annotations

import sys


def force_fp32_tuning() -> None:
    """Make every compressor the CLI builds get `amp=False` (the keyword its constructor reads)."""
    from auto_round.compressors import base

    init = base.BaseOrchestrator.__init__

    def init_without_amp(self, *args, **kwargs):
        kwargs["amp"] = False
        return init(self, *args, **kwargs)

    base.BaseOrchestrator.__init__ = init_without_amp


def main() -> int:
    if "--disable_amp" in sys.argv[1:]:
        force_fp32_tuning()
    from auto_round.__main__ import run

    sys.argv[0] = "auto-round"
    return run()


if __name__ == "__main__":
    sys.exit(main())
